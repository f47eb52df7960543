"""Write the lock from the environment this runs in: `make lock` runs it in a fresh venv after the tests passed there.

constraints.txt        every distribution installed but csc-serve itself and pip, as name==version;
                       `make test`, `make serve` and .ci/run install with `-c constraints.txt`.
requirements-bento.txt the part of it that csc-serve[cpu,serve] needs, the same pins: the Bento's packages
                       (bentofile.yaml python.requirements_txt), so an image gets the versions the tests passed with.

A local version label is dropped (torch 2.13.0+cpu is written torch==2.13.0): `torch==2.13.0` matches the CPU build
that `pip install torch==2.13.0` takes from this machine's wheel, and is never resolved to anything else.
"""

from __future__ import annotations

import platform
import re
import sys
from importlib.metadata import distribution, distributions
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "csc-serve"
BENTO_EXTRAS = ("cpu", "serve")
SKIP = {PROJECT, "pip"}  # setuptools stays: torch needs it at run time


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned() -> dict[str, str]:
    """canonical name -> 'Name==version' for every installed distribution but SKIP."""
    pins = {}
    for dist in distributions():
        name = dist.metadata["Name"]
        if name and canonical(name) not in SKIP:
            pins[canonical(name)] = f"{name}=={dist.version.split('+')[0]}"
    return pins


def needed(root: str, extras: tuple[str, ...]) -> set[str]:
    """Canonical names of every distribution that ``root[extras]`` requires here, directly or not."""
    seen: set[tuple[str, str]] = set()
    names: set[str] = set()
    todo = [(root, extra) for extra in ("", *extras)]
    while todo:
        name, extra = todo.pop()
        if (canonical(name), extra) in seen:
            continue
        seen.add((canonical(name), extra))
        names.add(canonical(name))
        for line in distribution(name).requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                todo += [(req.name, e) for e in ("", *req.extras)]
    return names


def write(path: Path, header: str, lines: list[str]) -> None:
    lines = sorted(lines, key=lambda line: canonical(line.split("==")[0]))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(header + "".join(f"{line}\n" for line in lines))
    tmp.replace(path)


def main(extras: str) -> None:
    pins = pinned()
    where = f"Python {platform.python_version()}, {platform.system()} {platform.machine()}"
    write(ROOT / "constraints.txt",
          f"# Every dependency at the version the tests last passed with ({where}). Written by `make lock`:\n"
          f"# a fresh venv, `pip install torch==2.13.0` (the CPU build), `pip install -e \".[{extras}]\"` with\n"
          "# nothing pinned, the tests, then this file. Install with it as constraints, torch first:\n"
          "#   pip install torch==2.13.0 && pip install -c constraints.txt -e \".[cpu,train,dev,serve,ray,client]\"\n",
          list(pins.values()))
    bento = sorted(pins[name] for name in needed(PROJECT, BENTO_EXTRAS) - SKIP)
    write(ROOT / "requirements-bento.txt",
          f"# The Bento's packages: what {PROJECT}[{','.join(BENTO_EXTRAS)}] needs, pinned as in constraints.txt "
          "(written with it by `make lock`).\n",
          bento)
    print(f"constraints.txt: {len(pins)} pins; requirements-bento.txt: {len(bento)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cpu,train,dev,serve,ray,client")
