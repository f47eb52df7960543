"""The browser page at ``/ui/`` in headless Chromium (Selenium), served by a real ``bentoml serve`` that requires
a bearer token.

The page is driven as a user drives it: the token typed in, a PNG file chosen, the sigma slider moved with the
keyboard, "auto" ticked, an atom clicked. Every number it shows is checked against the same request sent to the
HTTP API directly, and what it draws against the arrays the API returns. Needs the Debian packages ``chromium``
and ``chromium-driver`` (``apt-get install -y chromium chromium-driver``; CI installs them).
"""

import io
import os
import shutil

import httpx
import numpy as np
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from csc_serve.models.metrics import psnr
from csc_serve.service.process import ServerProcess
from tests.test_service_http import LIMITS, ROOT, image, png

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
# Outside CI a machine without the browser skips these tests; CI installs it (.ci/run), so there they must run.
pytestmark = pytest.mark.skipif((CHROMIUM is None or CHROMEDRIVER is None) and not os.environ.get("CI"),
                                reason="needs chromium and chromedriver (apt-get install -y chromium chromium-driver)")
TOKEN = "ui-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# The page computes in float64 from the same float32 arrays, in another order: only the sums' rounding differs.
NUMBER_TOL = 1e-6
WAIT_S = 120


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("serve")
    env = {"CSC_CACHE_DIR": str(home / "cache"), "BENTOML_HOME": str(home / "bentoml"), **LIMITS,
           "CSC_SERVE_TOKEN": TOKEN}
    with ServerProcess(env=env, cwd=ROOT, target=None, timeout=240) as running:  # no target: bentofile.yaml
        yield running


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,1000", "--force-device-scale-factor=1", "--renderer-process-limit=1"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, for get_log
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_script_timeout(WAIT_S)
    yield driver
    driver.quit()


@pytest.fixture
def page(server, browser, tmp_path):
    """The page, opened at /ui (no token needed for that), with the token typed in; a noisy PNG to upload."""
    browser.get(server.url + "/ui")
    assert browser.current_url == server.url + "/ui/" and browser.title.startswith("csc-serve")
    token = browser.find_element(By.ID, "token")
    token.clear()
    token.send_keys(TOKEN, Keys.TAB)  # a change event: the page connects with it
    settle(browser)
    assert "csc-ctrl-rgb" in text(browser, "model")
    upload = tmp_path / "noisy.png"
    upload.write_bytes(png(image(48, 64, seed=3)))
    return upload


def settle(browser, until=None):
    """Wait until the page has no request in flight (and ``until(browser)`` holds)."""
    def done(driver):
        idle = driver.find_element(By.ID, "status").get_attribute("data-state") == "idle"
        return idle and (until is None or until(driver))

    WebDriverWait(browser, WAIT_S, poll_frequency=0.1).until(done)


def text(browser, element_id: str) -> str:
    return browser.find_element(By.ID, element_id).text


def value(browser, element_id: str) -> float:
    return float(browser.find_element(By.ID, element_id).get_attribute("data-value"))


def pixels(browser, selector: str) -> np.ndarray:
    """The pixels of the canvas at a CSS selector as (H, W, 3) uint8."""
    width, height, data = browser.execute_script(
        "const c = document.querySelector(arguments[0]);"
        "return [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)];",
        selector)
    return np.array(data, np.uint8).reshape(height, width, 4)[..., :3]


def api(server, route, upload=None, **fields) -> httpx.Response:
    """A multipart request, as the page sends (``fields`` as form fields, ``upload`` as the image), checked."""
    parts = {key: (None, str(v)) for key, v in fields.items()}
    if upload is not None:
        parts["image"] = (upload.name, upload.read_bytes())
    reply = httpx.post(server.url + route, files=parts, headers=AUTH, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply


def npz(reply: httpx.Response) -> dict:
    with np.load(io.BytesIO(reply.content), allow_pickle=False) as f:
        return {name: f[name] for name in f.files}


def as_8bit(array: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(array, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)


def check_denoised(browser, server, upload, **fields):
    """The page's denoised image and numbers equal those of /denoise called directly."""
    reply = api(server, "/denoise", upload, output="npy", **fields)
    denoised = np.load(io.BytesIO(reply.content), allow_pickle=False)
    sent = np.asarray(Image.open(upload), np.float64).transpose(2, 0, 1) / 255
    assert value(browser, "psnr") == pytest.approx(psnr(denoised, sent, clip=True), abs=NUMBER_TOL)
    assert text(browser, "psnr") == f"{value(browser, 'psnr'):.2f} dB"
    scale = reply.headers["x-csc-lmbda-scale"]
    assert browser.find_element(By.ID, "scale").get_attribute("data-value") == scale
    assert value(browser, "sparsity") == pytest.approx(float(reply.headers["x-csc-sparsity"]), abs=NUMBER_TOL)
    assert 0 < value(browser, "time") < 1000 * WAIT_S
    # Drawn as the service's PNG answer draws it: clipped, rounded to 8 bits (half-way cases may round apart).
    assert np.abs(pixels(browser, "#denoised").astype(int) - as_8bit(denoised)).max() <= 1
    return reply


# ----------------------------------------------------------------------------- the page's files
def test_the_page_is_open_its_api_calls_need_the_token_and_the_docs_stay_at_the_root(server):
    page = httpx.get(server.url + "/ui/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]  # nothing from elsewhere
    for name, kind in [("app.js", "text/javascript"), ("arrays.js", "text/javascript"), ("style.css", "text/css"),
                       ("sample.png", "image/png")]:
        reply = httpx.get(f"{server.url}/ui/{name}", timeout=30)
        assert reply.status_code == 200 and reply.headers["content-type"].startswith(kind), name
    assert Image.open(io.BytesIO(httpx.get(server.url + "/ui/sample.png", timeout=30).content)).mode == "RGB"
    for hidden in ("__init__.py", "../api.py", "nothing.js"):
        assert httpx.get(f"{server.url}/ui/{hidden}", timeout=30).status_code == 404, hidden
    assert httpx.get(server.url + "/ui", timeout=30).status_code in (307, 308)  # to /ui/
    root = httpx.get(server.url + "/", timeout=30)
    assert root.status_code == 200 and "csc-serve" not in root.text  # BentoML's own page, with its Swagger UI
    assert httpx.post(server.url + "/metadata", timeout=30).status_code == 401


def test_the_page_reads_npy_and_npz_files_as_numpy_writes_them(server, browser):
    arrays = {"f4": np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7, "f8": np.float64(np.nan),
              "i8": np.array([0, -3, 2**40], np.int64), "f2": np.array([0.5, -2.25, 65504], np.float16),
              "u1": np.array([[0, 255], [7, 8]], np.uint8), "b1": np.array([True, False])}
    files = {}
    for name, save in [("stored", np.savez), ("deflated", np.savez_compressed)]:
        out = io.BytesIO()
        save(out, **arrays)
        files[name] = list(out.getvalue())
    one = io.BytesIO()
    np.save(one, arrays["f4"])
    files["npy"] = list(one.getvalue())
    browser.get(server.url + "/ui/")
    read = browser.execute_async_script("""
        const [files, done] = arguments;
        const { readNpy, readNpz } = await import("./arrays.js");
        const plain = (a) => ({ dtype: a.dtype, shape: a.shape, data: Array.from(a.data, (v) => String(v)) });
        const out = { npy: plain(readNpy(new Uint8Array(files.npy).buffer)) };
        for (const name of ["stored", "deflated"]) {
          const arrays = await readNpz(new Uint8Array(files[name]).buffer);
          out[name] = Object.fromEntries(Object.entries(arrays).map(([key, a]) => [key, plain(a)]));
        }
        done(out);""", files)
    for archive in (read["stored"], read["deflated"], {"f4": read["npy"]}):
        for name, got in archive.items():
            expected = arrays[name]
            assert got["dtype"] == name and tuple(got["shape"]) == expected.shape, name
            values = np.array([float(v) for v in got["data"]])  # JS prints numbers exactly ("NaN" included)
            np.testing.assert_array_equal(values, expected.astype(np.float64).ravel(), err_msg=name)


# ----------------------------------------------------------------------------- denoising
def test_upload_and_slider_show_the_numbers_the_api_gives(server, browser, page, tmp_path):
    browser.find_element(By.ID, "file").send_keys(str(page))
    settle(browser, lambda d: d.find_element(By.ID, "sparsity").get_attribute("data-value"))
    assert text(browser, "sigma-value") == "25"
    assert text(browser, "sigma-used") == "25.0 (given)"
    check_denoised(browser, server, page, sigma=25)
    sent = np.asarray(Image.open(page))
    assert np.array_equal(pixels(browser, "#input"), sent)  # the browser decoded the PNG as the service does
    before = value(browser, "sparsity")

    slider = browser.find_element(By.ID, "sigma")
    slider.send_keys(Keys.ARROW_RIGHT * 10)  # 25 -> 35: one request, once the slider rests
    settle(browser, lambda d: d.find_element(By.ID, "sigma-used").get_attribute("data-value") == "35")
    assert text(browser, "sigma-value") == "35"
    check_denoised(browser, server, page, sigma=35)
    assert value(browser, "sparsity") > before  # a larger threshold: more zero codes

    browser.find_element(By.ID, "auto").click()  # sigma estimated by the server
    settle(browser, lambda d: "estimated" in d.find_element(By.ID, "sigma-used").text)
    reply = check_denoised(browser, server, page)
    assert reply.headers["x-csc-sigma-source"] == "estimated"
    assert value(browser, "sigma-used") == pytest.approx(float(reply.headers["x-csc-sigma"]), rel=1e-6)
    assert not slider.is_enabled() and text(browser, "sigma-value") == "auto"
    assert not browser.find_element(By.ID, "error").is_displayed()
    browser.save_screenshot(str(tmp_path / "ui-denoise.png"))
    assert Image.open(tmp_path / "ui-denoise.png").size[0] > 0


def test_the_bundled_sample_denoises_and_the_page_logs_no_errors(server, browser, page, tmp_path):
    browser.get_log("browser")  # what earlier pages logged
    browser.find_element(By.ID, "sample").click()
    settle(browser, lambda d: d.find_element(By.ID, "sparsity").get_attribute("data-value"))
    assert "sample.png (128×128)" in text(browser, "input-caption")
    sample = tmp_path / "sample.png"
    sample.write_bytes(httpx.get(server.url + "/ui/sample.png", timeout=30).content)
    check_denoised(browser, server, sample, sigma=25)
    if browser.find_elements(By.CSS_SELECTOR, "#atoms .atom"):  # the service has /atoms and /explain
        strongest = int(npz(api(server, "/explain", sample, sigma=25, top=1))["top"][0])
        browser.find_element(By.CSS_SELECTOR, f"#atoms .atom[data-atom='{strongest}']").click()
        settle(browser, lambda d: d.find_element(By.ID, "explain-title").text == f"Atom {strongest}")
    assert [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"] == []
    browser.save_screenshot(str(tmp_path / "ui-sample.png"))


# ----------------------------------------------------------------------------- bad input
def test_a_bad_upload_or_token_shows_the_services_one_line_error(server, browser, page, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"plain text, not an image " * 20)
    browser.find_element(By.ID, "file").send_keys(str(bad))
    error = browser.find_element(By.ID, "error")
    settle(browser, lambda d: error.is_displayed())
    direct = httpx.post(server.url + "/denoise", files={"image": (bad.name, bad.read_bytes())},
                        data={"sigma": "25", "output": "npy"}, headers=AUTH, timeout=60)
    assert direct.status_code == 400
    assert error.text == direct.json()["error"] and "\n" not in error.text
    assert text(browser, "psnr") == "–"

    token = browser.find_element(By.ID, "token")
    token.clear()
    token.send_keys("wrong", Keys.TAB)
    settle(browser, lambda d: "token" in error.text)
    unauthorized = httpx.post(server.url + "/metadata", headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert unauthorized.status_code == 401 and error.text == unauthorized.json()["error"]
    browser.save_screenshot(str(tmp_path / "ui-error.png"))


# ----------------------------------------------------------------------------- atoms
@pytest.fixture
def atoms(server):
    reply = httpx.post(server.url + "/atoms", files={"output": (None, "npy")}, headers=AUTH, timeout=120)
    assert reply.status_code == 200, reply.text
    return np.load(io.BytesIO(reply.content), allow_pickle=False)  # (K, C, h, w)


def test_the_atom_grid_shows_every_atom_of_the_last_stage(server, browser, page, atoms):
    settle(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#atoms .atom"))
    buttons = browser.find_elements(By.CSS_SELECTOR, "#atoms .atom")
    assert len(buttons) == atoms.shape[0]
    grid = api(server, "/atoms", output="png")
    assert text(browser, "atoms-info").startswith(f"({grid.headers['x-csc-atoms']} atoms")
    for k in (0, 1, atoms.shape[0] // 2, atoms.shape[0] - 1):
        drawn = pixels(browser, f"#atoms [data-atom='{k}'] canvas").astype(float).transpose(2, 0, 1)
        assert drawn.shape[1:] == atoms.shape[2:]
        # Each atom is stretched on its own for the PNG: whatever the stretch, a cell that is atom k correlates
        # with atom k's values; one pixel off (a separator in view) would not.
        assert np.corrcoef(drawn.ravel(), atoms[k].ravel())[0, 1] > 0.98, k


def test_clicking_an_atom_shows_where_it_fires_and_the_image_without_it(server, browser, page, atoms, tmp_path):
    browser.find_element(By.ID, "file").send_keys(str(page))
    settle(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#atoms .atom")
           and d.find_element(By.ID, "sparsity").get_attribute("data-value"))
    strongest = int(npz(api(server, "/explain", page, sigma=25, top=1))["top"][0])
    browser.find_element(By.CSS_SELECTOR, f"#atoms .atom[data-atom='{strongest}']").click()
    settle(browser, lambda d: d.find_element(By.ID, "explain-title").text == f"Atom {strongest}")
    reply = api(server, "/explain", page, sigma=25, atoms=strongest, top=16)
    direct = npz(reply)
    assert value(browser, "energy") == pytest.approx(direct["energy"][strongest], abs=NUMBER_TOL)
    assert value(browser, "rank") == 1
    assert value(browser, "active") == np.count_nonzero(direct["activations"][0])
    expected = psnr(direct["without"], direct["reconstruction"], clip=True)
    assert value(browser, "without-psnr") == pytest.approx(expected, abs=NUMBER_TOL)
    assert np.abs(pixels(browser, "#without").astype(int) - as_8bit(direct["without"])).max() <= 1
    assert np.abs(pixels(browser, "#partial").astype(int) - as_8bit(direct["partial"])).max() <= 1
    heat = pixels(browser, "#activation")  # |code| on a black-red-yellow-white scale: black where it is zero
    assert heat.shape[:2] == direct["activations"].shape[1:]
    assert np.array_equal(heat.sum(-1) > 0, direct["activations"][0] != 0)
    top = [int(b.text) for b in browser.find_elements(By.CSS_SELECTOR, "#top button")]
    assert top == [int(a) for a in reply.headers["x-csc-top"].split(",")]

    quiet = int(np.argmin(direct["energy"]))  # the weakest atom in this image
    browser.find_element(By.CSS_SELECTOR, f"#atoms .atom[data-atom='{quiet}']").click()
    settle(browser, lambda d: d.find_element(By.ID, "explain-title").text == f"Atom {quiet}")
    assert value(browser, "energy") == pytest.approx(direct["energy"][quiet], abs=NUMBER_TOL)
    assert value(browser, "rank") == 1 + np.sum(direct["energy"] > direct["energy"][quiet])

    slider = browser.find_element(By.ID, "sigma")
    slider.send_keys(Keys.ARROW_LEFT * 15)  # sigma 10: the selected atom is explained again at the new level
    settle(browser, lambda d: d.find_element(By.ID, "sigma-used").get_attribute("data-value") == "10")
    again = npz(api(server, "/explain", page, sigma=10, atoms=quiet, top=16))
    assert value(browser, "energy") == pytest.approx(again["energy"][quiet], abs=NUMBER_TOL)
    browser.save_screenshot(str(tmp_path / "ui-atoms.png"))
