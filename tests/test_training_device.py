"""Training beyond one CPU process: the device, bf16 autocast, loader workers, one all_reduce per update,
throughput, checkpoints by time and on signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from csc_serve.cli.main import main
from csc_serve.models import CSCAutoencoder, load_pretrained
from csc_serve.training import run as run_module
from csc_serve.training import trainer as trainer_module
from csc_serve.training.data import ImageFolderDataset, list_images
from csc_serve.training.device import autocast, resolve_device
from csc_serve.training.loader import StepBatches, batch_loader
from csc_serve.training.presets import PRESETS
from csc_serve.training.run import train
from csc_serve.training.trainer import TrainConfig, Trainer
from tests.test_training import ROOT, tiny_run, weights, write_image_folder

NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("data"))


def step_batches(data_dir: Path, rank: int = 0) -> StepBatches:
    images = ImageFolderDataset(list_images(data_dir), 3, crop_size=16, seed=3)
    return StepBatches(images, batch_size=4, sigma_max=30.0, clean_fraction=0.25, seed=3, rank=rank)


def test_batches_keep_the_draws_of_seed_step_and_rank(data_dir):
    """The batch of a step is drawn exactly as the trainer always drew it, so earlier runs replay."""
    batches = step_batches(data_dir, rank=1)
    images = batches.images
    for step in (0, 5):
        rng = np.random.default_rng([3, step, 1])
        clean = torch.stack([images.crop(int(i), step) for i in rng.integers(0, len(images), 4)])
        sigma = torch.from_numpy(rng.uniform(0, 30.0, 4) * (rng.random(4) >= 0.25)).float()
        gen = torch.Generator().manual_seed(3 * 1_000_003 + step * 101 + 1)
        noisy = clean + sigma.view(-1, 1, 1, 1) / 255.0 * torch.randn(clean.shape, generator=gen)
        batch = batches[step]
        assert batch.step == step
        assert torch.equal(batch.clean, clean) and torch.equal(batch.sigma, sigma) and torch.equal(batch.noisy, noisy)


def test_loader_batches_are_identical_for_any_number_of_workers(data_dir):
    batches = step_batches(data_dir)
    inline = list(batch_loader(batches, 2, 7, workers=0, pin_memory=False))
    parallel = list(batch_loader(batches, 2, 7, workers=2, pin_memory=False))
    assert [b.step for b in inline] == [b.step for b in parallel] == [2, 3, 4, 5, 6]
    for a, b in zip(inline, parallel):
        assert all(torch.equal(x, y) for x, y in zip(a[1:], b[1:]))
    assert not torch.equal(inline[0].clean, inline[1].clean)  # every step has its own crops


def test_workers_do_not_change_the_trained_model(data_dir, tmp_path):
    inline = weights(train(tiny_run(data_dir, tmp_path / "w0", workers=0), PRESETS["tiny"], progress=False))
    parallel = weights(train(tiny_run(data_dir, tmp_path / "w2", workers=2), PRESETS["tiny"], progress=False))
    assert all(torch.equal(a, b) for a, b in zip(inline, parallel))


def test_device_names_and_unavailable_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    mps = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    with pytest.raises(ValueError, match="cuda:99"):
        resolve_device("cuda:99")  # no machine has a hundred GPUs
    with pytest.raises(ValueError, match="device must be"):
        TrainConfig(data="d", out="o", device="gpu")
    with pytest.raises(ValueError, match="workers"):
        TrainConfig(data="d", out="o", workers=-1)


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA: 'cuda' is available")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(ValueError, match="not available"):
        resolve_device("cuda")


def test_unavailable_device_is_one_line_cli_error_and_writes_nothing(data_dir, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "csc_serve.cli", "train", "--data", str(data_dir), "--out", str(out),
               "--preset", "tiny", "--device", "cuda:99"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "cuda:99" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_bf16_steps_give_finite_losses_and_move_the_model(data_dir):
    def run(bf16: bool) -> tuple[list[torch.Tensor], list[dict[str, float]], Trainer]:
        torch.manual_seed(0)
        model = CSCAutoencoder(PRESETS["tiny"]).train()
        config = tiny_run(data_dir, "unused", rate_weight=1e-2, bf16=bf16, device="cpu")
        trainer = Trainer(model, config, ImageFolderDataset(list_images(data_dir), 3, crop_size=16), None)
        with autocast(trainer.device, bf16):
            metrics = [trainer.train_step(step) for step in range(3)]
        return [s.dictionary.detach().clone() for s in model.stages], metrics, trainer

    torch.manual_seed(0)
    start = [s.dictionary.detach().clone() for s in CSCAutoencoder(PRESETS["tiny"]).stages]
    low, low_metrics, trainer = run(True)
    full, _, _ = run(False)
    assert all(np.isfinite(v) for m in low_metrics for v in m.values())
    assert low_metrics[0]["rate"] > 0 and low_metrics[0]["delta_rate_f"] >= 0
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in low)
    assert not all(torch.equal(a, b) for a, b in zip(start, low))  # the model moved
    assert not all(torch.equal(a, b) for a, b in zip(full, low))  # and bf16 autocast was in effect
    states = [v for opt in trainer.optimizers.values() for s in opt.state.values() for v in s.values()]
    assert states and all(v.dtype == torch.float32 for v in states)
    assert all(s.lipschitz.dtype == torch.float32 for s in trainer.model.stages)


def test_metrics_and_provenance_record_throughput_device_and_bf16(data_dir, tmp_path):
    out = train(tiny_run(data_dir, tmp_path / "m", bf16=True, workers=0), PRESETS["tiny"], progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records and all(r["crops_per_s"] > 0 for r in records)
    provenance = load_pretrained(out).config.provenance
    assert provenance["device"] == "cpu" and provenance["bf16"] is True and "gpu" not in provenance
    assert provenance["train_config"]["bf16"] is True and "cpus" in provenance["machine"]


def test_checkpoints_by_time_add_to_checkpoints_by_steps(data_dir, tmp_path, monkeypatch):
    written: list[int] = []
    real_save = run_module.save_checkpoint

    def spy(trainer, out):
        written.append(trainer.step)
        real_save(trainer, out)

    monkeypatch.setattr(run_module, "save_checkpoint", spy)
    for minutes, expected in ((0.0, [4]), (60.0, [4]), (1e-9, [1, 2, 3, 4])):  # 1e-9 min: due after every step
        written.clear()
        config = tiny_run(data_dir, tmp_path / f"m{minutes}", checkpoint_every=100, checkpoint_minutes=minutes)
        train(config, PRESETS["tiny"], progress=False)
        assert written == expected, minutes


def test_resume_may_change_device_workers_bf16_and_checkpoint_minutes(data_dir, tmp_path):
    out = tmp_path / "m"
    train(tiny_run(data_dir, out, iterations=2, workers=0), PRESETS["tiny"], progress=False)
    changed = tiny_run(data_dir, out, iterations=3, workers=1, device="cpu", bf16=True, checkpoint_minutes=5.0)
    train(changed, resume=True, progress=False)
    assert load_pretrained(out).config.provenance["checkpoint_step"] == 3


def test_one_all_reduce_per_update_averages_every_gradient(monkeypatch):
    calls = []

    def all_reduce(tensor):  # two processes with the same gradients: the sum doubles them
        calls.append(tensor.shape)
        tensor.mul_(2)

    monkeypatch.setattr(trainer_module, "_world", lambda: (0, 2))
    monkeypatch.setattr(trainer_module.dist, "all_reduce", all_reduce)
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4)),
              torch.nn.Parameter(torch.randn(2))]
    grads = [torch.randn(3, 2), torch.randn(4)]
    params[0].grad, params[1].grad = grads[0].clone(), grads[1].clone()
    trainer_module._average_gradients(params)
    assert calls == [torch.Size([12])]
    assert torch.equal(params[0].grad, grads[0]) and torch.equal(params[1].grad, grads[1])
    assert torch.equal(params[2].grad, torch.zeros(2))  # no gradient is a zero gradient


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU")
def test_a_cpu_checkpoint_resumes_on_cuda(data_dir, tmp_path):
    out = tmp_path / "m"
    train(tiny_run(data_dir, out, iterations=2, device="cpu"), PRESETS["tiny"], progress=False)
    train(tiny_run(data_dir, out, iterations=4, device="cuda"), resume=True, progress=False)
    model = load_pretrained(out)
    provenance = model.config.provenance
    assert provenance["device"].startswith("cuda") and provenance["gpu"] and provenance["checkpoint_step"] == 4
    assert all(torch.isfinite(w).all() for w in weights(out))


def _wait_for(condition, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_writes_a_checkpoint_and_resume_finishes(tmp_path, signum, code):
    data, out = write_image_folder(tmp_path / "data", count=4, size=24), tmp_path / "m"
    args = ["--data", str(data), "--out", str(out), "--preset", "tiny", "--crop-size", "16", "--batch-size", "2",
            "--rate-batch", "2", "--eval-every", "100000", "--checkpoint-every", "2", "--eval-images", "1",
            "--holdout-fraction", "0.25", "--sigma-max", "30", "--figures", "0", "--workers", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "csc_serve.cli", "train", *args, "--iterations", "100000", "--threads", "1"]
    # A session of its own: the signal reaches every process of the group, loader workers too, as Ctrl-C does.
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _wait_for(lambda: (out / "checkpoint" / "state.json").is_file(), 120, proc)
        os.killpg(proc.pid, signum)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, stderr[-3000:]
    message = stderr.strip().splitlines()[-1]
    assert signal.Signals(signum).name in message and "--resume" in message and "csc train" in message
    step = json.loads((out / "checkpoint" / "state.json").read_text())["step"]
    assert f"after step {step};" in message and step >= 2
    assert not (out / "model.safetensors").exists() and not list(out.glob(".checkpoint*"))
    assert main(["train", *args, "--iterations", str(step + 2), "--resume"]) == 0
    assert load_pretrained(out).config.provenance["checkpoint_step"] == step + 2
