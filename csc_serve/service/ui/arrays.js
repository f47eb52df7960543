// Readers for numpy's .npy and .npz files, the arrays the service answers with (output=npy, /explain).
//
// .npy (format versions 1 to 3): the magic "\x93NUMPY", a version, a header length (2 bytes in version 1,
// 4 after), then a Python dict literal such as {'descr': '<f4', 'fortran_order': False, 'shape': (3, 64, 64), }
// and the raw values. Read here: little-endian (or byte-sized) float16/32/64, int8/16/32/64, uint8/16/32 and
// bool, in C order. int64 values come back as a Float64Array (exact up to 2^53, far beyond any index here);
// float16 as a Float32Array. Anything else (big-endian, Fortran order, object arrays) is refused with an Error.
//
// .npz: a zip archive of .npy files, one per array ("energy.npy" holds the array "energy"). numpy.savez
// stores its entries (method 0) and numpy.savez_compressed deflates them (method 8, inflated here with the
// browser's DecompressionStream); numpy writes ZIP64 records, which are read as well. Entries are found
// through the central directory at the end of the archive, which always carries their sizes.

const NPY_MAGIC = [0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59]; // \x93NUMPY
const DTYPES = {
  f2: [2, null], f4: [4, Float32Array], f8: [8, Float64Array],
  i1: [1, Int8Array], i2: [2, Int16Array], i4: [4, Int32Array], i8: [8, null],
  u1: [1, Uint8Array], u2: [2, Uint16Array], u4: [4, Uint32Array], b1: [1, Uint8Array],
};

/** An .npy file's array: {dtype: "f4" etc., shape: [..], data: a typed array of prod(shape) values}. */
export function readNpy(buffer) {
  const bytes = new Uint8Array(buffer);
  if (bytes.length < 10 || NPY_MAGIC.some((b, i) => bytes[i] !== b)) throw new Error("not an .npy file");
  const view = new DataView(buffer);
  const major = bytes[6];
  const headerLength = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  const header = new TextDecoder("latin1").decode(bytes.subarray(start, start + headerLength));
  const descr = /'descr':\s*'([^']*)'/.exec(header);
  const fortran = /'fortran_order':\s*(True|False)/.exec(header);
  const shapeText = /'shape':\s*\(([^)]*)\)/.exec(header);
  if (!descr || !fortran || !shapeText) throw new Error("malformed .npy header");
  if (fortran[1] === "True") throw new Error(".npy in Fortran order is not read here");
  const order = descr[1][0], dtype = descr[1].slice(1);
  if (!(dtype in DTYPES) || order === ">" || (order === "|" && DTYPES[dtype][0] !== 1)) {
    throw new Error(`.npy dtype ${descr[1]} is not read here`);
  }
  const shape = shapeText[1].split(",").map((s) => s.trim()).filter((s) => s).map(Number);
  const count = shape.reduce((a, b) => a * b, 1);
  const [size, Typed] = DTYPES[dtype];
  const offset = start + headerLength;
  if (offset + count * size > bytes.length) throw new Error(".npy file is truncated");
  const raw = buffer.slice(offset, offset + count * size); // a copy at offset 0: typed arrays need alignment
  let data;
  if (dtype === "i8") {
    data = Float64Array.from(new BigInt64Array(raw), Number);
  } else if (dtype === "f2") {
    data = Float32Array.from(new Uint16Array(raw), halfToFloat);
  } else {
    data = new Typed(raw);
  }
  return { dtype, shape, data };
}

/** An .npz archive's arrays: {name: array as readNpy gives it}. Async: deflated entries inflate in a stream. */
export async function readNpz(buffer) {
  const view = new DataView(buffer);
  const arrays = {};
  for (const entry of centralDirectory(view)) {
    const local = entry.localOffset;
    if (view.getUint32(local, true) !== 0x04034b50) throw new Error("npz: broken local file header");
    const dataStart = local + 30 + view.getUint16(local + 26, true) + view.getUint16(local + 28, true);
    let data = buffer.slice(dataStart, dataStart + entry.compressedSize);
    if (entry.method === 8) {
      data = await inflateRaw(data);
    } else if (entry.method !== 0) {
      throw new Error(`npz: compression method ${entry.method} is not read here`);
    }
    arrays[entry.name.replace(/\.npy$/, "")] = readNpy(data);
  }
  return arrays;
}

function centralDirectory(view) {
  // The end-of-central-directory record: 22 bytes and a comment of up to 65535 bytes, at the very end.
  let eocd = -1;
  for (let i = view.byteLength - 22; i >= Math.max(0, view.byteLength - 22 - 65535); i--) {
    if (view.getUint32(i, true) === 0x06054b50) { eocd = i; break; }
  }
  if (eocd < 0) throw new Error("not an .npz (zip) archive");
  let count = view.getUint16(eocd + 10, true);
  let offset = view.getUint32(eocd + 16, true);
  if ((count === 0xffff || offset === 0xffffffff) && eocd >= 20 && view.getUint32(eocd - 20, true) === 0x07064b50) {
    const zip64 = Number(view.getBigUint64(eocd - 20 + 8, true)); // the ZIP64 end record, from its locator
    count = Number(view.getBigUint64(zip64 + 32, true));
    offset = Number(view.getBigUint64(zip64 + 48, true));
  }
  const entries = [];
  for (let i = 0; i < count; i++) {
    if (view.getUint32(offset, true) !== 0x02014b50) throw new Error("npz: broken central directory");
    const nameLength = view.getUint16(offset + 28, true);
    const extraLength = view.getUint16(offset + 30, true);
    const commentLength = view.getUint16(offset + 32, true);
    const name = new TextDecoder().decode(new Uint8Array(view.buffer, offset + 46, nameLength));
    const entry = {
      name, method: view.getUint16(offset + 10, true), compressedSize: view.getUint32(offset + 20, true),
      size: view.getUint32(offset + 24, true), localOffset: view.getUint32(offset + 42, true),
    };
    readZip64Extra(view, offset + 46 + nameLength, extraLength, entry);
    entries.push(entry);
    offset += 46 + nameLength + extraLength + commentLength;
  }
  return entries;
}

function readZip64Extra(view, start, length, entry) {
  // Fields whose 32-bit value is 0xFFFFFFFF carry their real value, in this order, in the extra field 0x0001.
  for (let at = start; at + 4 <= start + length;) {
    const id = view.getUint16(at, true), size = view.getUint16(at + 2, true);
    if (id === 0x0001) {
      let field = at + 4;
      for (const key of ["size", "compressedSize", "localOffset"]) {
        if (entry[key] === 0xffffffff && field + 8 <= at + 4 + size) {
          entry[key] = Number(view.getBigUint64(field, true));
          field += 8;
        }
      }
    }
    at += 4 + size;
  }
}

async function inflateRaw(data) {
  const stream = new Blob([data]).stream().pipeThrough(new DecompressionStream("deflate-raw"));
  return new Response(stream).arrayBuffer();
}

function halfToFloat(h) {
  const sign = h & 0x8000 ? -1 : 1, exponent = (h >> 10) & 0x1f, fraction = h & 0x3ff;
  if (exponent === 0) return sign * 2 ** -14 * (fraction / 1024);
  if (exponent === 0x1f) return fraction ? NaN : sign * Infinity;
  return sign * 2 ** (exponent - 15) * (1 + fraction / 1024);
}
