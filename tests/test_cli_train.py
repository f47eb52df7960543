"""``csc train`` and ``csc eval`` from the command line, on tiny image folders."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from csc_serve.cli.main import main
from tests.test_training import write_image_folder

TINY = ["--preset", "tiny", "--crop-size", "16", "--batch-size", "4", "--iterations", "3", "--rate-batch", "2",
        "--eval-every", "3", "--checkpoint-every", "3", "--eval-images", "2", "--holdout-fraction", "0.3",
        "--sigma-max", "30", "--figures", "0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = write_image_folder(root / "data")
    assert main(["train", "--data", str(data), "--out", str(root / "model"), *TINY]) == 0
    return data, root / "model"


def test_train_help_explains_every_setting():
    done = subprocess.run([sys.executable, "-m", "csc_serve.cli", "train", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    for flag in ("--data", "--out", "--resume", "--sigma-max", "--rate-weight", "--preset", "--init"):
        assert flag in done.stdout
    assert "default" in done.stdout


def test_eval_prints_psnr_and_sparsity(trained, capsys, tmp_path):
    data, model = trained
    assert main(["eval", str(model), "--data", str(data), "--task", "reconstruct"]) == 0
    assert "reconstruct: PSNR" in capsys.readouterr().out
    report = tmp_path / "r.json"
    args = ["eval", str(model), "--data", str(data), "--task", "denoise", "--sigma", "25", "--json", str(report)]
    assert main(args) == 0
    line = capsys.readouterr().out
    assert "denoise sigma=25: PSNR" in line and "zero codes" in line and "s per image" in line
    record = json.loads(report.read_text())
    assert record["images"] == 6 and len(record["per_image"]) == 6
    assert record["seconds_per_image"] > 0
    assert record["psnr"] == pytest.approx(sum(record["per_image"]) / 6)


def test_eval_is_reproducible_and_seeded(trained, tmp_path):
    data, model = trained
    results = []
    for seed in (0, 0, 1):
        out = tmp_path / f"{len(results)}.json"
        main(["eval", str(model), "--data", str(data), "--task", "denoise", "--seed", str(seed), "--json", str(out)])
        results.append(json.loads(out.read_text())["psnr"])
    assert results[0] == results[1] != results[2]


def test_eval_on_the_training_holdout(trained, tmp_path, capsys):
    """--holdout evaluates the images a training with that fraction never saw, and only those."""
    import shutil

    from csc_serve.models.images import list_images
    from csc_serve.training.data import split_paths

    data, model = trained
    held = split_paths(list_images(data), 0.3, 0)[1]
    assert 0 < len(held) < len(list_images(data))
    only = tmp_path / "held"
    only.mkdir()
    for path in held:
        shutil.copy(path, only / path.name)
    records = []
    for folder, extra in ((data, ["--holdout", "0.3"]), (only, [])):
        out = tmp_path / f"{len(records)}.json"
        args = ["eval", str(model), "--data", str(folder), "--task", "denoise", "--json", str(out), *extra]
        assert main(args) == 0
        records.append(json.loads(out.read_text()))
    assert records[0]["images"] == len(held)
    assert records[0]["per_image"] == records[1]["per_image"]
    assert main(["eval", str(model), "--data", str(data), "--holdout", "1.5"]) != 0
    assert "holdout_fraction must be in [0, 1)" in capsys.readouterr().err


def test_blind_eval_reports_its_estimate(trained, capsys):
    data, model = trained
    assert main(["eval", str(model), "--data", str(data), "--task", "denoise", "--sigma", "30", "--blind"]) == 0
    assert "mean estimated sigma" in capsys.readouterr().out


def test_resume_from_the_command_line(trained, tmp_path):
    data, _ = trained
    out = tmp_path / "m"
    assert main(["train", "--data", str(data), "--out", str(out), *TINY]) == 0
    longer = [a if a != "3" else "5" for a in TINY]
    assert main(["train", "--data", str(data), "--out", str(out), "--resume", *longer]) == 0
    config = json.loads((out / "config.json").read_text())
    provenance = config["architecture"]["provenance"]
    assert provenance["train_config"]["iterations"] == 5 and provenance["checkpoint_step"] == 5


def test_a_run_from_another_model_records_its_command_and_the_models_history(trained, tmp_path):
    data, first = trained
    first_provenance = json.loads((first / "config.json").read_text())["architecture"]["provenance"]
    out = tmp_path / "second"
    args = ["train", "--data", str(data), "--out", str(out), "--init", str(first), *TINY[2:]]  # no --preset
    assert main(args) == 0
    provenance = json.loads((out / "config.json").read_text())["architecture"]["provenance"]
    assert provenance["command"] == " ".join(["csc", *args])
    assert provenance["init"] == {"model": str(first), **first_provenance}
    assert provenance["command"] != first_provenance["command"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--data", "no-such-dir", "--out", "OUT"], "not a directory"),
        (["train", "--data", "DATA", "--out", "OUT", "--batch-size", "0"], "batch_size"),
        (["train", "--data", "DATA", "--out", "OUT", "--resume"], "no checkpoint"),
        (["eval", "MODEL", "--data", "DATA", "--task", "denoise", "--sigma", "0"], "sigma"),
        (["eval", "no-such-model", "--data", "DATA"], "no such model"),
    ],
)
def test_bad_input_one_line_no_traceback(trained, tmp_path, args, message):
    data, model = trained
    args = [str(data) if a == "DATA" else str(model) if a == "MODEL" else str(tmp_path / "o") if a == "OUT" else a
            for a in args]
    done = subprocess.run([sys.executable, "-m", "csc_serve.cli", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
