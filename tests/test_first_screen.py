"""The README's first screen, run as written.

Its Quick start is two commands, each followed by what it prints: ``make serve`` (run here with its install step
taken as done, ``make -o STAMP``), then the ``curl`` line that denoises the sample shipped with the package. The
server runs with every package that ``csc-serve[cpu,serve]`` does not bring made unimportable, so what
``make serve`` installs is all it needs. ``make -n`` (a dry run) shows what each target installs.
"""

import fnmatch
import importlib.metadata
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from packaging.requirements import Requirement
from PIL import Image

from csc_serve import estimate_noise_sigma
from csc_serve.service.process import ServerProcess

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
README_URL = "http://localhost:3000"
SERVING_EXTRAS = {"cpu", "serve"}
# What a fresh `python -m venv` holds before anything is installed into it.
FRESH_VENV = {"pip", "setuptools"}
# The estimate of sigma, and the scale calibrated for it, may move in their last digits with the CPU and BLAS.
HEADER_RTOL = 1e-3

needs_make = pytest.mark.skipif(not shutil.which("make"), reason="needs make (apt-get install -y make)")
needs_curl = pytest.mark.skipif(not shutil.which("curl"), reason="needs curl (apt-get install -y curl)")


def quick_start() -> tuple[list[str], list[str]]:
    """The README's Quick start: its commands (```bash blocks) and what they print (```text blocks), in order."""
    text = (ROOT / "README.md").read_text()
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    assert headings[:2] == ["Quick start", "Browser page"], headings  # the first section, the page right after
    section = text[text.index("## Quick start"):]
    section = section[: section.index("\n## ", 1)]
    commands = [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]
    printed = [block.strip() for block in re.findall(r"```text\n(.*?)```", section, flags=re.S)]
    assert commands[0] == "make serve" and commands[1].startswith("curl ") and len(commands) == len(printed) == 2
    return commands, printed


def make_env(**extra: str) -> dict[str, str]:
    """This environment without the flags of a `make` this test may run under (`make test`)."""
    env = {key: value for key, value in os.environ.items() if key not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return {**env, **extra}


def dry_run(target: str, venv: Path) -> str:
    result = subprocess.run(["make", "--no-print-directory", "-n", target, f"VENV={venv}"], cwd=ROOT,
                            env=make_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def installed_extras(commands: str) -> list[set[str]]:
    """The extras of every `pip install ... -e ".[EXTRAS]"` line of a dry run."""
    return [set(extras.split(",")) for extras in re.findall(r'pip install .*-e "\.\[([^\]]*)\]"', commands)]


# ----------------------------------------------------------------------------- make serve installs less
@needs_make
def test_make_serve_installs_only_the_serving_extras_and_prints_the_page_url_first(tmp_path):
    venv = tmp_path / "venv"  # nothing there yet: every step shows
    serve = dry_run("serve", venv)
    assert installed_extras(serve) == [SERVING_EXTRAS]
    lines = serve.splitlines()
    page = next(i for i, line in enumerate(lines) if f"{README_URL}/ui/" in line)
    server = next(i for i, line in enumerate(lines) if "bentoml serve" in line)
    assert lines[page].startswith("echo ") and page < server
    assert "pip install" not in "\n".join(lines[page:])  # everything is installed before the URL is printed

    test = dry_run("test", venv)
    assert installed_extras(test) == [{"cpu", "train", "dev", "serve", "ray", "client"}]
    assert "pytest" in test.splitlines()[-1]


@needs_make
def test_a_serving_install_leaves_the_test_extras_to_install(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    (venv / f".installed-{','.join(sorted(SERVING_EXTRAS))}").touch()  # what `make serve` leaves after installing
    assert installed_extras(dry_run("serve", venv)) == []
    assert installed_extras(dry_run("test", venv)) == [{"cpu", "train", "dev", "serve", "ray", "client"}]
    assert installed_extras(dry_run("lint", venv)) == [{"cpu", "train", "dev", "serve", "ray", "client"}]


# ----------------------------------------------------------------------------- the image of the curl line
def test_the_curl_image_ships_with_the_package():
    commands, _ = quick_start()
    (image,) = re.findall(r"image=@(\S+)", commands[1])
    path = ROOT / image
    assert path.is_file() and path.stat().st_size < 200_000
    with Image.open(path) as opened:
        assert opened.format == "PNG"
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package = str(path.parent.relative_to(ROOT)).replace("/", ".")
    assert package in setuptools["packages"]
    assert any(fnmatch.fnmatch(path.name, pattern) for pattern in setuptools["package-data"][package])
    include = yaml.safe_load((ROOT / "bentofile.yaml").read_text())["include"]
    assert any(fnmatch.fnmatch(image, pattern) for pattern in include)  # fnmatch's * also matches "/"


# ----------------------------------------------------------------------------- the first screen, for real
def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def serving_distributions() -> set[str]:
    """csc-serve and every installed distribution that csc-serve[cpu,serve] requires, directly or not."""
    found, seen, todo = set(), set(), [("csc-serve", frozenset(SERVING_EXTRAS))]
    while todo:
        name, extras = todo.pop()
        if (canonical(name), extras) in seen:
            continue
        seen.add((canonical(name), extras))
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional dependency for another platform
        found.add(canonical(name))
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or any(requirement.marker.evaluate({"extra": extra})
                                                 for extra in extras | {""}):
                todo.append((requirement.name, frozenset(requirement.extras)))
    return found | FRESH_VENV


def modules_outside(distributions: set[str]) -> set[str]:
    """Top-level modules installed here by distributions none of which is in ``distributions``."""
    return {module for module, owners in importlib.metadata.packages_distributions().items()
            if not {canonical(owner) for owner in owners} & distributions}


SITECUSTOMIZE = """
import os
import sys

ABSENT = set({absent!r})


class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, Absent())
with open({record!r}, "a") as record:
    record.write(f"{{os.getpid()}}\\n")
"""


class MakeServe(ServerProcess):
    """`make serve` on a free port, its install step taken as done; ready when `/readyz` answers 200."""

    def start(self) -> None:
        venv = Path(sys.prefix)
        stamp = f"{venv}/.installed-{','.join(sorted(SERVING_EXTRAS))}"
        command = ["make", "--no-print-directory", "-o", stamp, "serve", f"VENV={venv}", f"PORT={self.port}",
                   "SERVE_ARGS=--host 127.0.0.1"]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, env=self.env, cwd=self.cwd, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.wait_ready()
        except BaseException:
            self.stop(keep_log=True)  # the error names the log
            raise


def same_line(shown: str, printed: str) -> bool:
    """``printed`` reads as ``shown``: the same words, and numbers equal to HEADER_RTOL."""
    number = r"-?\d+(?:\.\d+)?"
    if re.sub(number, "#", shown) != re.sub(number, "#", printed):
        return False
    return all(math.isclose(float(a), float(b), rel_tol=HEADER_RTOL)
               for a, b in zip(re.findall(number, shown), re.findall(number, printed)))


def as_image(path: Path) -> tuple[np.ndarray, torch.Tensor]:
    with Image.open(path) as opened:
        assert opened.format == "PNG" and opened.mode == "RGB", (opened.format, opened.mode)
        pixels = np.asarray(opened, np.float32)  # (H, W, 3)
    return pixels, torch.from_numpy(pixels.transpose(2, 0, 1) / 255)[None]


@needs_make
@needs_curl
def test_the_first_screen_prints_what_the_readme_shows(tmp_path):
    (make_serve, curl), (make_printed, curl_printed) = quick_start()
    if not (Path(sys.prefix) / "bin" / "bentoml").is_file():
        pytest.skip(f"no bentoml command in {sys.prefix}/bin: make serve runs the one of its venv")
    site = tmp_path / "site"
    site.mkdir()
    record = tmp_path / "processes.txt"
    absent = modules_outside(serving_distributions())
    assert {"matplotlib", "pytest", "ray"} <= absent  # the train, dev and ray extras
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(absent=sorted(absent), record=str(record)))
    home = tmp_path / "home"
    env = make_env(PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
                   CSC_CACHE_DIR=str(home / "cache"), BENTOML_HOME=str(home / "bentoml"))

    # The curl line as written, from a folder laid out like the repository root for the file it sends.
    work = tmp_path / "work"
    (image,) = re.findall(r"image=@(\S+)", curl)
    (work / image).parent.mkdir(parents=True)
    shutil.copy2(ROOT / image, work / image)

    with MakeServe(env=env, cwd=ROOT, target=None, timeout=240) as server:
        assert make_serve == "make serve"
        served = server.log_path.read_text()
        for line in make_printed.splitlines():
            assert line.replace("localhost:3000", f"localhost:{server.port}") in served.splitlines(), served
        result = subprocess.run(["bash", "-o", "pipefail", "-c", curl.replace(README_URL, server.url)], cwd=work,
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert len(set(record.read_text().split())) >= 2  # `bentoml serve` and the worker that runs the model

    shown, printed = curl_printed.splitlines(), [line.rstrip("\r") for line in result.stdout.splitlines()]
    assert printed[0] == shown[0] == "HTTP/1.1 200 OK"
    split = lambda lines: dict(line.lower().split(": ", 1) for line in lines[1:])  # noqa: E731
    shown_headers, printed_headers = split(shown), split(printed)
    assert shown_headers.keys() == printed_headers.keys(), printed
    for name, value in shown_headers.items():
        assert same_line(value, printed_headers[name]), (name, value, printed_headers[name])

    # The file it writes: the sample, denoised. Removing noise of sigma s moves pixels by about s (RMS).
    (output,) = re.findall(r"-o (\S+)", curl)
    noisy, noisy_tensor = as_image(work / image)
    denoised, denoised_tensor = as_image(work / output)
    assert denoised.shape == noisy.shape
    sigma = float(printed_headers["x-csc-sigma"])
    assert math.isclose(sigma, estimate_noise_sigma(noisy_tensor).item(), rel_tol=HEADER_RTOL)
    assert estimate_noise_sigma(denoised_tensor).item() < 0.2 * sigma
    assert 0.5 * sigma < np.sqrt(np.mean((denoised - noisy) ** 2)) < 1.5 * sigma
