"""csc-serve is one self-contained import package, seen from outside the repository.

- From a folder with packages of its own named ``models`` and ``export``: the README's examples, ``python -m
  csc_serve.cli --help`` and a backend run work, and those names still mean the user's packages afterwards.
- A wheel (not the editable install) in a clean venv holds one top-level package, csc_serve, and runs the
  bundled model.
- A Bento made by ``bentoml build`` serves from the BentoML store with no checkout and no csc_serve installed.
- The lock: constraints.txt pins every dependency, torch to exactly 2.13.0, and the Bento's packages are the
  same pins.

The clean venvs take their third-party packages from this venv's site-packages through a .pth file: a path line
in a .pth file adds that folder to sys.path without processing the .pth files inside it, so the editable
install's finder is not active there, and ``import csc_serve`` fails (checked) until a wheel is installed.
"""

import io
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import httpx
import numpy as np
import yaml
from PIL import Image

from csc_serve.service.process import ServerProcess
from tests.test_readme import readme_python_examples

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
USER_PACKAGES = ("models", "export")


def run(args, cwd, env=None, timeout=300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(arg) for arg in args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, (f"{' '.join(map(str, args))} exited with {result.returncode}:\n"
                                    f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def outside_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This environment without PYTHONPATH, with caches in ``tmp_path``, and one OpenMP thread: on two cores shared
    with other work, torch's second thread mostly spins (the README's examples: 17 s, against 2 minutes)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return {**env, "CSC_CACHE_DIR": str(tmp_path / "cache"), "BENTOML_DO_NOT_TRACK": "True", "OMP_NUM_THREADS": "1",
            **extra}


def clean_venv(path: Path) -> Path:
    """A venv without csc_serve that imports this venv's third-party packages (by a .pth file); its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    python = path / "bin" / "python"
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=path).stdout.strip()
    ours = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    (Path(site) / "csc-test-dependencies.pth").write_text("".join(f"{folder}\n" for folder in ours))
    probe = subprocess.run([str(python), "-c", "import numpy, bentoml, csc_serve"], cwd=path, capture_output=True,
                           text=True, timeout=120)
    assert probe.returncode != 0 and "No module named 'csc_serve'" in probe.stderr, probe.stderr[-3000:]
    return python


def noisy_image(height=40, width=56) -> tuple[np.ndarray, np.ndarray]:
    """A smooth colour gradient (3, H, W) in [0, 1], and it with Gaussian noise of sigma 25 / 255."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    clean = np.stack([0.3 + 0.5 * x, 0.2 + 0.6 * y, 0.5 + 0.3 * x * y]).astype(np.float32)
    noise = np.random.default_rng(0).normal(0, 25 / 255, clean.shape).astype(np.float32)
    return clean, clean + noise


# ----------------------------------------------------------------------------- a user's own models/ and export/
USER_SCRIPT = """
import runpy
import sys
from pathlib import Path

import numpy as np

# `python -m csc_serve.cli --help`, run as -m runs it.
sys.argv = ["csc", "--help"]
try:
    runpy.run_module("csc_serve.cli", run_name="__main__", alter_sys=True)
except SystemExit as done:
    assert done.code in (0, None), f"csc --help exited with {done.code}"

exec(compile(Path("readme_examples.py").read_text(), "README.md", "exec"), {"__name__": "__main__"})

from csc_serve import load_backend

backend = load_backend("csc-ctrl-rgb", "torch")
image = np.random.default_rng(0).random((1, 3, 24, 32), dtype=np.float32)
codes = backend.encode(image)
assert codes.ndim == 4 and codes.shape[0] == 1 and np.isfinite(codes).all(), codes.shape
assert backend.decode(codes, output_size=(24, 32)).shape == (1, 3, 24, 32)

import csc_serve.export
import csc_serve.models
import export
import models

for mine, theirs in ((models, csc_serve.models), (export, csc_serve.export)):
    assert Path(mine.__file__).resolve() == (Path.cwd() / mine.__name__ / "__init__.py").resolve(), mine.__file__
    assert mine.WHOSE == f"the user's {mine.__name__}" and mine is not theirs
print("user packages intact")
"""


def test_readme_cli_and_backend_run_beside_a_users_models_and_export_packages(tmp_path):
    user = tmp_path / "user"
    for name in USER_PACKAGES:
        (user / name).mkdir(parents=True)
        (user / name / "__init__.py").write_text(f"WHOSE = \"the user's {name}\"\n")
    (user / "readme_examples.py").write_text(readme_python_examples())
    (user / "check.py").write_text(USER_SCRIPT)
    result = run([sys.executable, "check.py"], cwd=user, env=outside_env(tmp_path))
    assert "usage:" in result.stdout and "viz" in result.stdout  # csc --help
    assert result.stdout.rstrip().endswith("user packages intact")
    assert (user / "my-model" / "model.safetensors").is_file()  # the README's save_pretrained


# ----------------------------------------------------------------------------- a wheel in a clean venv
WHEEL_CHECK = """
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

import csc_serve

venv = Path(sys.prefix).resolve()
for name in ("csc_serve", "csc_serve.models", "csc_serve.export", "csc_serve.training", "csc_serve.service"):
    origin = Path(importlib.util.find_spec(name).origin).resolve()
    assert origin.is_relative_to(venv), f"{name} imported from {origin}, not from {venv}"
assert [name for name in ("models", "training", "export") if importlib.util.find_spec(name)] == []

model = csc_serve.CSCAutoencoder.from_pretrained("csc-ctrl-rgb")
clean, noisy = (torch.from_numpy(np.load(name))[None] for name in ("clean.npy", "noisy.npy"))
with torch.no_grad():
    denoised = model.denoise(noisy, 25.0)
assert denoised.shape == noisy.shape
before, after = ((a - clean).pow(2).mean().item() for a in (noisy, denoised))
assert after < before / 2, (before, after)
print(csc_serve.__file__)
"""


def test_wheel_holds_one_package_that_runs_from_a_clean_venv(tmp_path):
    # Built from a copy of pyproject.toml, its readme and its package-dir folders: a stale build/ (or anything
    # else in the checkout) cannot reach the wheel.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    source = tmp_path / "source"
    for folder in set(project["tool"]["setuptools"]["package-dir"].values()):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", project["project"]["readme"]):
        shutil.copy2(ROOT / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", source, "--no-deps", "-w", tmp_path / "dist"], cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("csc_serve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == {"csc_serve"}
    assert {"csc_serve/models/pretrained/csc-ctrl-rgb/model.safetensors", "csc_serve/models/layer.py",
            "csc_serve/export/onnx_export.py", "csc_serve/training/trainer.py"} <= set(names)

    python = clean_venv(tmp_path / "venv")  # import csc_serve fails there
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", wheel], cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = outside_env(tmp_path)
    help_text = run([tmp_path / "venv" / "bin" / "csc", "--help"], cwd=elsewhere, env=env).stdout
    assert "usage:" in help_text and "viz" in help_text
    clean, noisy = noisy_image()
    np.save(elsewhere / "clean.npy", clean)
    np.save(elsewhere / "noisy.npy", noisy)
    (elsewhere / "check.py").write_text(WHEEL_CHECK)
    printed = run([python, "check.py"], cwd=elsewhere, env=env).stdout.strip()
    assert Path(printed).resolve().is_relative_to((tmp_path / "venv").resolve())


# ----------------------------------------------------------------------------- a Bento served from the store
def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def test_bento_serves_from_the_store_with_no_checkout_and_no_install(tmp_path):
    env = outside_env(tmp_path, BENTOML_HOME=str(tmp_path / "bentoml"))
    built = run([sys.executable, "-m", "bentoml", "build", "--output", "tag"], cwd=ROOT, env=env).stdout
    tag = re.search(r"__tag__:(\S+)", built).group(1)
    name, version = tag.split(":")
    bento = tmp_path / "bentoml" / "bentos" / name / version
    packed_code = {path.name for path in (bento / "src").iterdir()}
    assert {"csc_serve", "models", "export"} <= packed_code and "training" not in packed_code  # serving: no training
    assert (bento / "src" / "models" / "pretrained" / "csc-ctrl-rgb" / "model.safetensors").is_file()
    # The Bento installs the lock's pins (bentoml adds its own, the same).
    packed = requirement_lines(bento / "env" / "python" / "requirements.txt")
    assert set(requirement_lines(ROOT / "requirements-bento.txt")) <= set(packed)
    assert all("==" in line for line in packed)
    assert len({canonical(line.split("==")[0]) for line in set(packed)}) == len(set(packed))  # one version a name

    python = clean_venv(tmp_path / "venv")  # import csc_serve fails there
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _, noisy = noisy_image()
    upload = io.BytesIO()
    Image.fromarray((np.clip(noisy, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)).save(upload, "PNG")
    with ServerProcess(env=env, cwd=elsewhere, target=tag, timeout=240, python=python) as server:
        reply = httpx.post(server.url + "/denoise", files={"image": ("noisy.png", upload.getvalue())},
                           data={"sigma": "25"}, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert Image.open(io.BytesIO(reply.content)).size == (56, 40)


# ----------------------------------------------------------------------------- the lock
def test_lock_pins_every_dependency_torch_exactly_and_the_bento_the_same():
    pins = requirement_lines(ROOT / "constraints.txt")
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+==[^\s+;]+", line) for line in pins), "name==version lines only"
    names = [canonical(line.split("==")[0]) for line in pins]
    assert len(names) == len(set(names)) and "csc-serve" not in names
    assert [line for line in pins if line.lower().startswith("torch==")] == ["torch==2.13.0"]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = [*project["dependencies"], *(req for extra in ("cpu", "train", "dev", "serve", "ray", "client")
                                           for req in extras[extra])]
    for requirement in wanted:
        name = canonical(re.match(r"[A-Za-z0-9._-]+", requirement).group(0))
        assert name in names, f"{requirement} is not in constraints.txt: run make lock"
    assert set(requirement_lines(ROOT / "requirements-bento.txt")) <= set(pins)
    python = yaml.safe_load((ROOT / "bentofile.yaml").read_text())["python"]
    assert python["requirements_txt"] == "requirements-bento.txt" and not python.get("lock_packages")
    assert not {"index_url", "extra_index_url", "find_links"} & set(python)  # PyPI only
