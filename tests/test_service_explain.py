"""The atoms at work: atoms in pixel space, a reconstruction split atom by atom, and /decode with atoms kept or
dropped; the maths on tiny models, the endpoints in-process and over HTTP from a real ``bentoml serve``."""

import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from csc_serve.models import CSCAutoencoder
from csc_serve.models.explain import atom_mask, explain, parse_atoms, pixel_atoms, tile_atoms
from csc_serve.service.process import ServerProcess

from .conftest import tiny_config
from .test_service_asgi import warm_app

CALIBRATION = ((0, 1.0), (25, 2.0), (50, 4.0))
CODE_CHANNELS = 8  # tiny_config: 8 last-stage atoms, total stride 2
# Float32 sums of a few dozen terms of order one, taken in another order: a few ulps each.
SUM_TOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODELS = {
    "plain": dict(),
    "shift-averaged": dict(shift_average=True, input_mean=(0.5, 0.4, 0.3)),
    "circular": dict(padding_mode="circular", nonnegative=False),
}


def model_of(kind: str) -> CSCAutoencoder:
    torch.manual_seed(0)
    return CSCAutoencoder(tiny_config(**MODELS[kind])).eval()


def picture(height=17, width=23, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random((3, height, width)).astype(np.float32)


# ----------------------------------------------------------------------------- the atom lists
@pytest.mark.parametrize("text,expected", [
    ("3", [3]), ("3,1,3", [1, 3]), (" 2 - 4 , 0 ", [0, 2, 3, 4]), ("5-5", [5]), ("0-7", list(range(8))),
    ("007", [7]),
])
def test_atom_lists_read_indices_and_inclusive_ranges_sorted_and_unique(text, expected):
    assert parse_atoms(text, CODE_CHANNELS).tolist() == expected
    assert parse_atoms(text, CODE_CHANNELS).dtype == np.int64


@pytest.mark.parametrize("text,num_atoms,limit,message", [
    ("", 8, None, "not an atom index"),
    ("3,,4", 8, None, "not an atom index"),
    ("a", 8, None, "'a' is not an atom index"),
    ("-1", 8, None, "not an atom index"),
    ("1.5", 8, None, "not an atom index"),
    ("\u0663", 8, None, "not an atom index"),  # an Arabic-Indic digit: int() would read it
    ("5-3", 8, None, "runs backwards"),
    ("8", 8, None, "atom 8 is out of range: the model has 8 atoms, 0 to 7"),
    ("0-99999999999999999", 8, None, "out of range"),
    ("0-64", 96, 64, "more than 64 atoms"),
    ("1,2,3-5", 96, 4, "more than 4 atoms"),
])
def test_bad_atom_lists_raise_one_line(text, num_atoms, limit, message):
    with pytest.raises(ValueError) as caught:
        parse_atoms(text, num_atoms, limit)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_an_atom_mask_keeps_the_listed_atoms_or_drops_them():
    assert atom_mask(np.array([1, 3]), 5).tolist() == [0, 1, 0, 1, 0]
    assert atom_mask(np.array([1, 3]), 5, keep=False).tolist() == [1, 0, 1, 0, 1]


# ----------------------------------------------------------------------------- the maths
@pytest.mark.parametrize("kind", MODELS)
def test_base_plus_every_atoms_contribution_is_the_reconstruction(kind):
    model = model_of(kind)
    x = picture()
    everything = explain(model, x, np.arange(CODE_CHANNELS), lmbda_scale=0.5)
    with torch.no_grad():
        reconstruction = model.reconstruct(torch.from_numpy(x)[None], 0.5)[0].numpy()
        codes = model.encode(torch.from_numpy(x)[None], 0.5)[0].numpy()
    np.testing.assert_allclose(everything.reconstruction, reconstruction, atol=SUM_TOL, rtol=0)
    np.testing.assert_allclose(everything.base + everything.contributions.sum(0), everything.reconstruction,
                               atol=SUM_TOL, rtol=0)
    np.testing.assert_array_equal(everything.codes, codes)  # the unshifted codes, as encode returns them
    assert np.abs(everything.contributions).max() > 1e-3  # the atoms do contribute
    assert everything.base.shape == x.shape and np.allclose(everything.base, model.input_mean[0].numpy())
    some = explain(model, x, [2, 5], lmbda_scale=0.5)  # an atom's part does not depend on the others asked for
    np.testing.assert_allclose(some.contributions, everything.contributions[[2, 5]], atol=1e-6, rtol=0)


def test_a_shift_averaged_contribution_is_the_mean_over_the_shifts():
    model = model_of("shift-averaged")
    x = picture(12, 10)
    atom = 3
    shifts = model.config.shifts
    assert len(shifts) == 4
    expected = np.zeros_like(x)
    with torch.no_grad():
        for dy, dx in shifts:  # the image shifted, its codes, atom 3's codes alone decoded, shifted back
            copy = torch.nn.functional.pad(torch.from_numpy(x)[None], (dx, 2 - dx, dy, 2 - dy), mode="replicate")
            codes = model.encode(copy)
            alone = torch.zeros_like(codes)
            alone[:, atom] = codes[:, atom]
            image = model.decode(alone) - model.input_mean
            expected += image[0, :, dy : dy + 12, dx : dx + 10].numpy() / len(shifts)
    np.testing.assert_allclose(explain(model, x, [atom]).contributions[0], expected, atol=1e-6, rtol=0)


def test_without_atoms_listed_the_strongest_are_split_out():
    model = model_of("plain")
    result = explain(model, picture(), None, strongest=3)
    ranked = np.argsort(-result.energy, kind="stable")
    assert result.atoms.tolist() == sorted(ranked[:3].tolist()) and result.contributions.shape[0] == 3
    np.testing.assert_allclose(result.energy, np.abs(result.codes).sum(axis=(1, 2)), rtol=1e-6)


@pytest.mark.parametrize("stage", [0, 1])
def test_pixel_atoms_are_what_a_unit_code_adds_to_the_image(stage):
    model = model_of("plain")
    atoms = pixel_atoms(model, stage)
    size = 7 if stage else 5
    assert atoms.shape == (model.config.stages[stage].num_atoms, 3, size, size)
    if stage == 0:
        torch.testing.assert_close(atoms, model.stages[0].dictionary.detach(), rtol=0, atol=0)
    # A unit code at code position (4, 5) of stage `stage`, synthesised through that stage and the ones before:
    # the atom, centred on pixel (4 S, 5 S), and nothing else.
    stride = 2 if stage else 1
    for k in (0, atoms.shape[0] - 1):
        codes = torch.zeros(1, atoms.shape[0], 10, 10)
        codes[0, k, 4, 5] = 1.0
        with torch.no_grad():
            image = codes
            for layer in reversed(model.stages[: stage + 1]):
                image = layer.decode(image)
        half, (cy, cx) = size // 2, (4 * stride, 5 * stride)
        torch.testing.assert_close(image[0, :, cy - half : cy + half + 1, cx - half : cx + half + 1], atoms[k])
        image[0, :, cy - half : cy + half + 1, cx - half : cx + half + 1] = 0
        assert float(image.abs().max()) == 0.0


def test_the_atom_grid_is_row_major_with_one_pixel_separators():
    atoms = np.random.default_rng(0).normal(size=(7, 3, 4, 5)).astype(np.float32)
    pixels, layout = tile_atoms(atoms)
    assert layout == (3, 3) and pixels.shape == (3 * 4 + 2, 3 * 5 + 2, 3) and pixels.dtype == np.uint8
    assert (pixels[4] == 255).all() and (pixels[:, 5] == 255).all()  # the separators
    cell = pixels[5:9, 6:11]  # atom 4: row 1, column 1
    assert cell.min() == 0 and cell.max() == 255
    stretched = (atoms[4] - atoms[4].min()) / (atoms[4].max() - atoms[4].min()) * 255
    np.testing.assert_allclose(cell, stretched.transpose(1, 2, 0), atol=0.5 + 1e-3)
    grey, _ = tile_atoms(atoms[:, :2])  # neither grey nor colour: the mean of the channels
    assert grey.shape == (14, 17)


# ----------------------------------------------------------------------------- the endpoints in-process
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    config = tiny_config(noise_calibration=CALIBRATION, shift_average=True, input_mean=(0.5, 0.5, 0.5))
    CSCAutoencoder(config).eval().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def app(model_dir):
    # 8 atoms of a 3x24x30 image at most: larger explanations get a 413
    with warm_app({"CSC_MODEL": str(model_dir), "CSC_BACKEND": "torch", "CSC_BATCH_WAIT_MS": "0",
                   "CSC_MAX_EXPLAIN_VALUES": str(8 * 3 * 24 * 30)}) as running:
        yield running


def npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def loaded(answer: httpx.Response):
    assert answer.status_code == 200, answer.text
    return np.load(io.BytesIO(answer.content), allow_pickle=False)


def test_atoms_come_as_an_array_or_a_grid_computed_once_per_stage(app):
    array = loaded(app.request("POST", "/atoms", json={"output": "npy"}))
    assert array.shape == (CODE_CHANNELS, 3, 7, 7) and array.dtype == np.float32
    grid = app.request("POST", "/atoms", files={"stage": (None, "0")})  # multipart fields, as the page sends
    assert grid.status_code == 200 and grid.headers["content-type"] == "image/png"
    assert (grid.headers["x-csc-atoms"], grid.headers["x-csc-atom-size"]) == ("6", "5,5")
    assert (grid.headers["x-csc-grid"], grid.headers["x-csc-stage"]) == ("2,3", "0")
    assert Image.open(io.BytesIO(grid.content)).size == (3 * 5 + 2, 2 * 5 + 1)
    empty = app.request("POST", "/atoms")
    assert empty.status_code == 200 and empty.headers["x-csc-stage"] == "1"
    again = loaded(app.request("POST", "/atoms", data={"output": "npy"}, files={"stage": (None, "1")}))
    np.testing.assert_array_equal(again, array)


def test_explain_answers_every_documented_array(app):
    x = picture(24, 30)
    files = {"image": ("x.npy", npy(x))}
    answer = app.request("POST", "/explain", files=files, data={"atoms": "6, 1-2", "lmbda_scale": "0.5"})
    with loaded(answer) as f:
        got = {name: f[name] for name in f.files}
    assert set(got) == {"energy", "top", "atoms", "activations", "contributions", "base", "reconstruction",
                        "partial", "without", "lmbda_scale", "sigma", "image_size"}
    assert got["atoms"].tolist() == [1, 2, 6] and got["atoms"].dtype == np.int64
    assert got["energy"].dtype == np.float64 and got["energy"].shape == (CODE_CHANNELS,)
    assert got["top"].tolist() == np.argsort(-got["energy"], kind="stable").tolist()  # top 16: all 8 atoms
    assert got["activations"].shape == (3, 12, 15) and got["contributions"].shape == (3, 3, 24, 30)
    assert got["contributions"].dtype == np.float32 and got["image_size"].tolist() == [24, 30]
    assert float(got["lmbda_scale"]) == 0.5 and np.isnan(got["sigma"])
    codes = loaded(app.request("POST", "/encode", files=files, data={"output": "npy", "lmbda_scale": "0.5"}))
    np.testing.assert_array_equal(got["activations"], codes[[1, 2, 6]])
    reconstruction = loaded(app.request("POST", "/reconstruct", files=files,
                                        data={"output": "npy", "lmbda_scale": "0.5"}))
    np.testing.assert_allclose(got["reconstruction"], reconstruction, atol=SUM_TOL, rtol=0)
    listed = got["contributions"].sum(0)
    np.testing.assert_allclose(got["partial"], got["base"] + listed, atol=1e-6, rtol=0)
    np.testing.assert_allclose(got["without"], got["reconstruction"] - listed, atol=1e-6, rtol=0)
    assert answer.headers["x-csc-top"] == ",".join(map(str, got["top"]))
    assert answer.headers["x-csc-lmbda-scale"] == "0.5" and float(answer.headers["x-csc-psnr"]) > 0
    assert float(answer.headers["x-csc-sparsity"]) == pytest.approx(1 - np.count_nonzero(codes) / codes.size)


def test_explain_splits_out_the_top_atoms_by_default_and_takes_a_sigma(app):
    answer = app.request("POST", "/explain", files={"image": ("x.npy", npy(picture(20, 20)))},
                         data={"sigma": "25", "top": "3"})
    with loaded(answer) as f:
        assert f["top"].shape == (3,) and f["atoms"].tolist() == sorted(f["top"].tolist())
        assert float(f["sigma"]) == 25 and float(f["lmbda_scale"]) == 2.0  # the calibration's knot
        np.testing.assert_allclose(f["base"] + f["contributions"].sum(0) - f["partial"], 0, atol=1e-6)


def test_decode_keeps_or_drops_atoms(app):
    codes = np.random.default_rng(1).normal(size=(CODE_CHANNELS, 5, 6)).astype(np.float32)
    files = {"codes": ("c.npy", npy(codes))}

    def decoded(**fields):
        answer = app.request("POST", "/decode", files=files, data={"output": "npy", **fields})
        return loaded(answer), answer.headers["x-csc-atoms-kept"]

    whole, kept_all = decoded()
    kept, kept_count = decoded(keep="1,4-5")
    dropped, left = decoded(drop="1,4-5")
    assert (kept_all, kept_count, left) == ("8", "3", "5")
    masked = codes * atom_mask(np.array([1, 4, 5]), CODE_CHANNELS)[:, None, None]
    alone = loaded(app.request("POST", "/decode", files={"codes": ("m.npy", npy(masked))}, data={"output": "npy"}))
    np.testing.assert_allclose(kept, alone, atol=1e-6, rtol=0)
    np.testing.assert_allclose(kept + dropped - whole, 0.5, atol=SUM_TOL)  # linear: the mean counted twice
    blank, count = decoded(keep="")
    np.testing.assert_array_equal(blank, whole)
    assert count == "8"
    _, count = decoded(keep="3")  # a form value of one number reaches the API as a number
    assert count == "1"


@pytest.mark.parametrize("route,fields,status,message", [
    ("/explain", {"atoms": "1-"}, 400, "atoms: '1-' is not an atom index"),
    ("/explain", {"atoms": "8"}, 400, "atoms: atom 8 is out of range"),
    ("/explain", {"atoms": "2-1"}, 400, "runs backwards"),
    ("/explain", {"sigma": "10", "lmbda_scale": "1"}, 400, "give sigma or lmbda_scale, not both"),
    ("/explain", {"top": "0"}, 400, "top: Input should be greater than or equal to 1"),
    ("/explain", {"lmbda_scale": "1000"}, 400, "lmbda_scale must lie in"),
    ("/explain", {"image_size": "big"}, 413, "beyond the cap of 17280"),
    ("/decode", {"keep": "1", "drop": "2"}, 400, "give keep or drop, not both"),
    ("/decode", {"drop": "0,x"}, 400, "drop: 'x' is not an atom index"),
    ("/decode", {"keep": "[1, 2]"}, 400, "keep: Input should be a valid string"),
    ("/atoms", {"stage": "2"}, 400, "stage must lie in [0, 1] (the model has 2 stages), got 2"),
    ("/atoms", {"stage": "-1"}, 400, "stage: Input should be greater than or equal to 0"),
])
def test_bad_lists_and_fields_get_a_documented_4xx_with_one_line(app, route, fields, status, message):
    files = {"codes": ("c.npy", npy(np.zeros((CODE_CHANNELS, 3, 3), np.float32)))} if route == "/decode" else {}
    if route == "/explain":
        size = (40, 40) if fields.pop("image_size", None) else (24, 30)
        files = {"image": ("x.npy", npy(picture(*size)))}
    answer = app.request("POST", route, files={**files, **{k: (None, v) for k, v in fields.items()}})
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert message in error and "\n" not in error
    documented = app.request("GET", "/docs.json").json()["paths"][route]["post"]["responses"]
    assert str(status) in documented


# ----------------------------------------------------------------------------- over HTTP
def test_a_real_server_answers_atoms_explain_and_masked_decode_over_http(model_dir, tmp_path):
    env = {"CSC_MODEL": str(model_dir), "CSC_BACKEND": "onnxruntime", "CSC_CACHE_DIR": str(tmp_path / "cache"),
           "BENTOML_HOME": str(tmp_path / "bentoml"), "CSC_BATCH_WAIT_MS": "0"}
    x = picture(21, 26, seed=3)
    with ServerProcess(env=env, timeout=240) as server:
        def post(route, **kwargs):
            return httpx.post(server.url + route, timeout=60, **kwargs)

        atoms = post("/atoms", files={"output": (None, "npy")})
        assert loaded(atoms).shape == (CODE_CHANNELS, 3, 7, 7) and atoms.headers["x-csc-stage"] == "1"
        grid = post("/atoms", json={"stage": 0})
        assert grid.headers["content-type"] == "image/png" and grid.headers["x-csc-grid"] == "2,3"
        files = {"image": ("x.npy", npy(x))}
        explained = post("/explain", files=files, data={"atoms": "0-7"})
        reconstruction = loaded(post("/reconstruct", files=files, data={"output": "npy"}))
        codes = post("/encode", files=files)
        kept = post("/decode", files={"codes": ("c.npz", codes.content)}, data={"keep": "0-3"})
        refused = post("/explain", files=files, data={"atoms": "3,99"})
    with loaded(explained) as f:
        # The server reconstructs with ONNX Runtime, /explain with PyTorch: the same maths, float32 apart.
        np.testing.assert_allclose(f["reconstruction"], reconstruction, atol=SUM_TOL, rtol=0)
        np.testing.assert_allclose(f["base"] + f["contributions"].sum(0), reconstruction, atol=SUM_TOL, rtol=0)
        assert f["atoms"].tolist() == list(range(8))
    assert kept.status_code == 200 and kept.headers["x-csc-atoms-kept"] == "4"
    assert refused.status_code == 400 and "atom 99 is out of range" in refused.json()["error"]
