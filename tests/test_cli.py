import subprocess
import sys

import pytest
from PIL import Image

from csc_serve.cli.main import main


def run_csc(*args):
    return subprocess.run([sys.executable, "-m", "csc_serve.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_the_commands():
    result = run_csc("--help")
    assert result.returncode == 0
    assert "viz" in result.stdout and "config.json" in result.stdout


def test_viz_writes_one_png_per_stage_with_every_atom(tiny_model, tmp_path, capsys):
    tiny_model.save_pretrained(tmp_path / "m")
    assert main(["viz", str(tmp_path / "m"), "--out", str(tmp_path / "figs"), "--scale", "2"]) == 0
    first = Image.open(tmp_path / "figs" / "atoms_stage1.png")
    second = Image.open(tmp_path / "figs" / "atoms_stage2.png")
    assert first.mode == "RGB" and second.mode == "RGB"
    # 6 atoms of 5x5 on a 3x3 grid with 1-pixel gaps, scaled by 2; 8 atoms of 7x7 (receptive field) on 3x3.
    assert first.size == ((3 * 6 + 1) * 2, (2 * 6 + 1) * 2)
    assert second.size == ((3 * 8 + 1) * 2, (3 * 8 + 1) * 2)
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["atoms_stage1.png", "atoms_stage2.png"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["viz", "no-such-model", "--out", "x"], "no such model directory"),
        (["viz", "m", "--out", "x", "--scale", "0"], "positive integer"),
        (["viz"], "required"),
    ],
)
def test_bad_input_gives_one_clear_line_and_a_non_zero_exit(args, message):
    result = run_csc(*args)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
