"""Fitting the noise calibration: the golden-section refinement of ``refine_calibration`` and ``csc calibrate``."""

import json
import math

import pytest
import torch

from csc_serve.cli.main import main
from csc_serve.models import CSCAutoencoder, load_pretrained
from csc_serve.training.calibration import _golden_section, refine_calibration
from csc_serve.training.evaluate import evaluate_images

from .conftest import tiny_config
from .test_training import write_image_folder

KNOTS = ((0.0, 1.0), (20.0, 3.0), (40.0, 4.0))


@pytest.mark.parametrize("peak", [-0.9, -0.2, 0.0, 0.37, 0.95])
def test_golden_section_closes_in_on_the_maximum(peak):
    calls = []

    def score(t: float) -> float:
        calls.append(t)
        return -((t - peak) ** 2)

    _golden_section(score, -1.0, 1.0, 12)
    assert len(calls) == 12
    # The bracket shrinks by 0.618 per call after the first: the best point is within 2 * 0.618^11 of the peak.
    assert min(abs(t - peak) for t in calls) < 2 * 0.618**11
    assert all(-1.0 <= t <= 1.0 for t in calls)


def test_refinement_searches_between_the_neighbours_of_the_best_candidate(smooth_pair):
    torch.manual_seed(0)
    model = CSCAutoencoder(tiny_config(noise_calibration=KNOTS)).eval()
    coarse = refine_calibration(model, smooth_pair, seed=3, steps=5, span=2.0)
    fine = refine_calibration(model, smooth_pair, seed=3, steps=5, span=2.0, refine=4)
    for (sigma, c), (_, f) in zip(coarse[1:], fine[1:]):
        # The neighbours of the best of 5 candidates over [s / 2, 2 s] are a factor sqrt(2) away.
        assert c / math.sqrt(2) - 1e-9 <= f <= c * math.sqrt(2) + 1e-9
        tuned = [CSCAutoencoder(tiny_config(noise_calibration=k)) for k in (coarse, fine)]
        scores = []
        for t in tuned:
            t.load_state_dict(model.state_dict())
            scores.append(evaluate_images(t.eval(), smooth_pair, "denoise", sigma=sigma, seed=3).psnr)
        assert scores[1] >= scores[0] - 1e-6  # the refined scale is the best met, coarse ones included


@pytest.fixture
def smooth_pair() -> list[torch.Tensor]:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 48), torch.linspace(0, 1, 48), indexing="ij")
    a = torch.stack([0.2 + 0.6 * xx, 0.3 + 0.4 * yy, 0.5 + 0.3 * (xx > 0.5).float()])
    b = torch.stack([0.7 - 0.5 * yy, 0.4 + 0.2 * xx, 0.3 + 0.4 * (yy > 0.3).float()])
    return [a, b]


@pytest.fixture
def calibrated_model(tmp_path):
    torch.manual_seed(0)
    model = CSCAutoencoder(tiny_config(noise_calibration=KNOTS, provenance={"command": "csc train --x"})).eval()
    model.save_pretrained(tmp_path / "model")
    return model, tmp_path / "model"


def test_csc_calibrate_writes_better_knots_and_says_how_they_were_found(tmp_path, calibrated_model, capsys):
    model, source = calibrated_model
    data = write_image_folder(tmp_path / "data", count=5, size=40)
    out = tmp_path / "calibrated"
    argv = ["calibrate", str(source), "--data", str(data), "--out", str(out), "--images", "3", "--crop-size", "32",
            "--steps", "3", "--refine", "2", "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "PSNR on the 3 images" in printed and f"{out}: written" in printed
    tuned = load_pretrained(out)
    knots = tuned.config.noise_calibration
    assert [k[0] for k in knots] == [k[0] for k in KNOTS] and knots[0] == (0.0, 1.0)
    for (_, new), (_, old) in zip(knots[1:], KNOTS[1:]):
        # 3 scales over [s / 1.5, 1.5 s], then a bracket one grid step either side of the best (past the ends)
        assert old / 1.5**2 - 1e-9 <= new <= old * 1.5**2 + 1e-9
    provenance = json.loads((out / "config.json").read_text())["architecture"]["provenance"]
    assert provenance["command"] == "csc train --x"  # what trained it stays
    assert provenance["calibration"] == {"command": "csc " + " ".join(argv), "data": str(data), "images": 3,
                                         "crop_size": 32}
    for name, param in tuned.state_dict().items():
        assert torch.equal(param, model.state_dict()[name]), name
    # Each printed row: the new PSNR is at least the old one on the same images.
    rows = [line for line in printed.splitlines() if ", was " in line]
    assert len(rows) == 2
    for row in rows:
        new, old = (float(v.rstrip(",")) for v in row.split()[-3:][::2])
        assert new >= old - 1e-6


def test_csc_calibrate_refuses_what_it_cannot_do(tmp_path, calibrated_model, capsys):
    _, source = calibrated_model
    data = write_image_folder(tmp_path / "data", count=2, size=32)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert main(["calibrate", str(source), "--data", str(data), "--out", str(out), "--quiet"]) == 1
    assert "already holds a model" in capsys.readouterr().err
    plain = tmp_path / "plain"
    CSCAutoencoder(tiny_config()).save_pretrained(plain)
    assert main(["calibrate", str(plain), "--data", str(data), "--out", str(tmp_path / "x"), "--quiet"]) == 1
    assert "has no noise calibration" in capsys.readouterr().err
    assert main(["calibrate", str(source), "--data", str(tmp_path / "none"), "--out", str(tmp_path / "y")]) == 1
    assert "not a directory" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    for option in (["--span", "1"], ["--refine", "-1"], ["--images", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["calibrate", str(source), "--data", str(data), "--out", str(tmp_path / "z"), *option])
        assert exit_info.value.code == 2
