// The page: an image goes up to /denoise at the sigma of the slider (or none: the server estimates it), and to
// /explain for the atom clicked in the grid that /atoms draws. Arrays come back as .npy/.npz (arrays.js) and are
// drawn on canvases here; PSNR is computed here from them, as the service computes it (models/metrics.py).
// Every call sends the token field as "Authorization: Bearer <token>" when it is filled in; an error answer's
// one-line "error" is shown as it is.

import { readNpy, readNpz } from "./arrays.js";

const API = new URL("..", document.baseURI); // the page lives at <service>/ui/
const MSE_FLOOR = 1e-12; // as csc_serve.models.metrics: a perfect match scores 120 dB
const EXPLAIN_WIDTH = 150; // CSS pixels of each image of the atom panel, side by side
const $ = (id) => document.getElementById(id);
const state = { file: null, input: null, atoms: null, selected: null, runs: { connect: 0, denoise: 0, explain: 0 } };
let busy = 0;

class ApiError extends Error {}

// ----------------------------------------------------------------------------- calls
function headers() {
  const token = $("token").value.trim();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function call(path, fields) {
  let form;
  if (fields) {
    form = new FormData();
    for (const [key, value] of Object.entries(fields)) {
      if (value === undefined || value === null) continue;
      if (value instanceof Blob) form.append(key, value, value.name || key);
      else form.append(key, String(value));
    }
  }
  let response;
  try {
    response = await fetch(new URL(path.replace(/^\//, ""), API), { method: "POST", body: form, headers: headers() });
  } catch (err) {
    throw new ApiError(`cannot reach the server (${err.message})`);
  }
  if (!response.ok) throw new ApiError(await errorLine(response));
  return response;
}

async function errorLine(response) {
  const text = await response.text();
  try {
    const error = JSON.parse(text).error;
    if (typeof error === "string" && error) return error;
  } catch { /* not JSON: the status line will do */ }
  return `${response.status} ${response.statusText || "error"}`.trim();
}

/** Run ``work`` with the footer reading "working…" (data-state="busy") until every piece of work is done. */
async function task(work) {
  setBusy(+1);
  try {
    await work();
  } finally {
    setBusy(-1);
  }
}

function setBusy(step) {
  busy += step;
  $("status").dataset.state = busy > 0 ? "busy" : "idle";
  $("status").textContent = busy > 0 ? "working…" : "ready";
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function show(id, text, value) {
  $(id).textContent = text;
  if (value !== undefined) $(id).dataset.value = String(value);
}

// ----------------------------------------------------------------------------- images and arrays
/** The uploaded file as the service reads it: 8-bit values / 255, alpha flattened onto white, EXIF applied. */
async function decodeInput(blob) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(blob, { colorSpaceConversion: "none" });
  } catch {
    return null; // a format the browser cannot draw (or not an image): the server will say which
  }
  const canvas = document.createElement("canvas");
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  const context = canvas.getContext("2d");
  context.fillStyle = "#fff";
  context.fillRect(0, 0, canvas.width, canvas.height);
  context.drawImage(bitmap, 0, 0);
  const { data } = context.getImageData(0, 0, canvas.width, canvas.height);
  const plane = canvas.width * canvas.height;
  const pixels = new Float32Array(3 * plane); // (3, H, W), as the service's arrays
  for (let i = 0; i < plane; i++) {
    for (let c = 0; c < 3; c++) pixels[c * plane + i] = data[4 * i + c] / 255;
  }
  return { width: canvas.width, height: canvas.height, pixels };
}

/** PSNR (dB) of a (C, H, W) estimate, clipped to [0, 1], against a (C, H, W) target of the same size. */
function psnr(estimate, target) {
  let sum = 0;
  for (let i = 0; i < estimate.length; i++) {
    const error = Math.min(Math.max(estimate[i], 0), 1) - target[i];
    sum += error * error;
  }
  return -10 * Math.log10(Math.max(sum / estimate.length, MSE_FLOOR));
}

/** The input in the array's channels: grey models see luma (ITU-R 601, as the service converts). */
function inputLike(array) {
  const { pixels, width, height } = state.input;
  const [channels, h, w] = array.shape;
  if (h !== height || w !== width) return null;
  if (channels === 3) return pixels;
  const plane = width * height, grey = new Float32Array(plane);
  for (let i = 0; i < plane; i++) {
    grey[i] = 0.299 * pixels[i] + 0.587 * pixels[plane + i] + 0.114 * pixels[2 * plane + i];
  }
  return grey;
}

/** Draw a (C, H, W) float array in [0, 1] (clipped) on a canvas, enlarged for small images. */
function drawImage(canvas, { shape, data }, displayWidth = undefined) {
  const [channels, height, width] = shape.length === 3 ? shape : [1, ...shape];
  const plane = width * height, out = new ImageData(width, height);
  for (let i = 0; i < plane; i++) {
    for (let c = 0; c < 3; c++) {
      const value = data[(channels === 1 ? 0 : c) * plane + i];
      out.data[4 * i + c] = Math.round(Math.min(Math.max(value, 0), 1) * 255);
    }
    out.data[4 * i + 3] = 255;
  }
  paint(canvas, out, width, height, displayWidth);
}

/** Draw |values| of an (h, w) map as heat (black, red, yellow, white), shown at the input's size. Black is
 * exactly the zero codes: a non-zero code, however small, starts at a visible dark red. */
function drawHeat(canvas, data, height, width, displayWidth) {
  let peak = 0;
  for (const v of data) peak = Math.max(peak, Math.abs(v));
  const out = new ImageData(width, height);
  for (let i = 0; i < width * height; i++) {
    const t = peak > 0 ? Math.abs(data[i]) / peak : 0;
    out.data[4 * i] = data[i] === 0 ? 0 : Math.max(48, Math.round(255 * Math.min(1, 3 * t)));
    out.data[4 * i + 1] = Math.round(255 * Math.min(1, Math.max(0, 3 * t - 1)));
    out.data[4 * i + 2] = Math.round(255 * Math.min(1, Math.max(0, 3 * t - 2)));
    out.data[4 * i + 3] = 255;
  }
  paint(canvas, out, width, height, displayWidth);
}

function paint(canvas, imageData, width, height, displayWidth) {
  canvas.width = width;
  canvas.height = height;
  canvas.getContext("2d").putImageData(imageData, 0, 0);
  const shown = displayWidth || width * Math.max(1, Math.floor(256 / Math.max(width, height)));
  canvas.style.width = `${shown}px`;
}

// ----------------------------------------------------------------------------- denoise
function sigmaField() {
  return $("auto").checked ? undefined : Number($("sigma").value);
}

async function runDenoise() {
  if (!state.file) return;
  const run = ++state.runs.denoise;
  const started = performance.now();
  try {
    const response = await call("/denoise", { image: state.file, sigma: sigmaField(), output: "npy" });
    const array = readNpy(await response.arrayBuffer());
    const elapsed = performance.now() - started;
    if (run !== state.runs.denoise) return; // a newer setting has been sent meanwhile
    showError("");
    drawImage($("denoised"), array);
    const target = state.input && inputLike(array);
    const value = target ? psnr(array.data, target) : null;
    show("psnr", value === null ? "n/a (the browser cannot decode this file)" : `${value.toFixed(2)} dB`, value ?? "");
    show("time", `${Math.round(elapsed)} ms`, elapsed);
    const scale = response.headers.get("x-csc-lmbda-scale");
    const sigma = response.headers.get("x-csc-sigma");
    show("scale", Number(scale).toFixed(3), scale);
    const source = response.headers.get("x-csc-sigma-source");
    show("sigma-used", sigma === null ? "none" : `${Number(sigma).toFixed(1)} (${source})`, sigma ?? "");
    // The zero codes the denoised image was made of, counted in the same pass.
    const sparsity = Number(response.headers.get("x-csc-sparsity"));
    show("sparsity", `${(100 * sparsity).toFixed(2)} %`, sparsity);
  } catch (err) {
    if (run !== state.runs.denoise) return;
    failed(err);
    for (const id of ["psnr", "sparsity", "time", "scale", "sigma-used"]) show(id, "–", "");
    clear($("denoised"));
    return;
  }
  if (state.selected !== null) await runExplain(state.selected);
}

function failed(err) {
  if (!(err instanceof ApiError)) console.error(err);
  showError(err instanceof ApiError ? err.message : `the page failed: ${err.message}`);
}

function clear(canvas) {
  canvas.width = canvas.height = 1;
}

async function useFile(blob) {
  state.file = blob;
  state.input = await decodeInput(blob);
  const canvas = $("input");
  if (state.input) {
    const { width, height, pixels } = state.input;
    drawImage(canvas, { shape: [3, height, width], data: pixels });
  } else {
    clear(canvas);
  }
  $("input-caption").textContent = `input: ${blob.name || "image"}` +
    (state.input ? ` (${state.input.width}×${state.input.height})` : "");
  await runDenoise();
}

// ----------------------------------------------------------------------------- atoms
async function loadAtoms(run) {
  let response, grid;
  try {
    response = await call("/atoms", { output: "png" });
    grid = await createImageBitmap(await response.blob());
  } catch (err) {
    if (run === state.runs.connect) show("atoms-info", `(not available: ${err.message})`);
    return;
  }
  if (run !== state.runs.connect) return;
  const numbers = (name) => (response.headers.get(name) || "").split(",").map(Number);
  const [count] = numbers("x-csc-atoms");
  const [height, width] = numbers("x-csc-atom-size");
  const [rows, cols] = numbers("x-csc-grid");
  const [stage] = numbers("x-csc-stage");
  // Cells of height x width with a 1-pixel separator between them (and around them, if the grid has a border).
  const border = Math.max(0, Math.round((grid.width - cols * width - (cols - 1)) / 2));
  const borderY = Math.max(0, Math.round((grid.height - rows * height - (rows - 1)) / 2));
  state.atoms = { count, height, width, grid, border, borderY, cols };
  show("atoms-info", `(${count} atoms of ${height}×${width}, stage ${stage})`, count);
  const holder = $("atoms");
  holder.replaceChildren();
  for (let k = 0; k < count; k++) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "atom";
    button.dataset.atom = String(k);
    button.title = `atom ${k}`;
    const canvas = document.createElement("canvas");
    drawAtom(canvas, k, 4);
    button.append(canvas);
    button.addEventListener("click", () => task(() => selectAtom(k)));
    holder.append(button);
  }
}

function drawAtom(canvas, k, zoom) {
  const { height, width, grid, border, borderY, cols } = state.atoms;
  const x = border + (k % cols) * (width + 1), y = borderY + Math.floor(k / cols) * (height + 1);
  canvas.width = width;
  canvas.height = height;
  canvas.getContext("2d").drawImage(grid, x, y, width, height, 0, 0, width, height);
  canvas.style.width = `${width * zoom}px`;
}

async function selectAtom(k) {
  state.selected = k;
  for (const button of $("atoms").children) button.classList.toggle("selected", Number(button.dataset.atom) === k);
  if (!state.file) {
    showError("choose an image (or the sample) first: the atom is shown in it");
    return;
  }
  await runExplain(k);
}

async function runExplain(k) {
  const run = ++state.runs.explain;
  const started = performance.now();
  try {
    const top = Math.min(16, state.atoms ? state.atoms.count : 16);
    const response = await call("/explain", { image: state.file, sigma: sigmaField(), atoms: k, top });
    const arrays = await readNpz(await response.arrayBuffer());
    const elapsed = performance.now() - started;
    if (run !== state.runs.explain) return;
    showError("");
    $("explain").hidden = false;
    $("explain-title").textContent = `Atom ${k}`;
    if (state.atoms) drawAtom($("atom-view"), k, 7);
    const [, h, w] = arrays.activations.shape;
    drawHeat($("activation"), arrays.activations.data, h, w, EXPLAIN_WIDTH); // one code per stride: enlarged
    drawImage($("partial"), arrays.partial, EXPLAIN_WIDTH);
    drawImage($("without"), arrays.without, EXPLAIN_WIDTH);
    const energy = arrays.energy.data;
    const rank = 1 + Array.from(energy).filter((e) => e > energy[k]).length;
    let active = 0;
    for (const v of arrays.activations.data) active += v !== 0;
    show("energy", energy[k].toFixed(4), energy[k]);
    show("rank", `${rank} of ${energy.length}`, rank);
    show("active", `${active} of ${h * w} (${(100 * active / (h * w)).toFixed(1)} %)`, active);
    const change = psnr(arrays.without.data, arrays.reconstruction.data);
    show("without-psnr", `${change.toFixed(2)} dB`, change);
    show("explain-time", `${Math.round(elapsed)} ms`, elapsed);
    showTop(Array.from(arrays.top.data), k);
  } catch (err) {
    if (run === state.runs.explain) failed(err);
  }
}

function showTop(top, k) {
  const holder = $("top");
  holder.replaceChildren();
  for (const atom of top) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = String(atom);
    button.dataset.atom = String(atom);
    if (atom === k) button.className = "selected";
    button.addEventListener("click", () => task(() => selectAtom(atom)));
    holder.append(button);
  }
  for (const button of $("atoms").children) button.classList.toggle("top", top.includes(Number(button.dataset.atom)));
}

// ----------------------------------------------------------------------------- the page
async function connect() {
  const run = ++state.runs.connect; // the token may change again before the answer comes
  try {
    const meta = await (await call("/metadata")).json();
    if (run !== state.runs.connect) return;
    const backend = meta.backend || {};
    show("model", `${meta.model?.reference ?? "model"} · ${backend.backend ?? "?"} (${backend.device ?? "?"})` +
      (meta.ready ? "" : " · loading"));
    showError("");
  } catch (err) {
    if (run !== state.runs.connect) return;
    show("model", "not connected");
    failed(err);
    return;
  }
  await loadAtoms(run);
}

let pending = null;
function onSigma() {
  $("sigma-value").textContent = $("auto").checked ? "auto" : $("sigma").value;
  if (pending === null) setBusy(+1);
  clearTimeout(pending);
  pending = setTimeout(async () => { // one request when the slider comes to rest
    pending = null;
    try {
      await runDenoise();
    } finally {
      setBusy(-1);
    }
  }, 250);
}

$("sigma").addEventListener("input", () => { $("sigma-value").textContent = $("sigma").value; });
$("sigma").addEventListener("change", onSigma);
$("auto").addEventListener("change", () => { $("sigma").disabled = $("auto").checked; onSigma(); });
$("file").addEventListener("change", () => {
  if ($("file").files[0]) task(() => useFile($("file").files[0]));
});
$("sample").addEventListener("click", () => task(async () => {
  const blob = await (await fetch("sample.png")).blob();
  await useFile(new File([blob], "sample.png", { type: "image/png" }));
}));
$("token").value = sessionStorage.getItem("csc-token") || "";
$("token").addEventListener("change", () => {
  sessionStorage.setItem("csc-token", $("token").value.trim());
  task(connect);
});
task(connect);
