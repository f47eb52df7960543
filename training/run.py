"""A training run end to end: data, checkpoints (atomic, resumable), metrics log, figures, the final model.

Layout of ``--out``::

    config.json, model.safetensors     the trained model (written at the end)
    checkpoint/                        model + optimizer.safetensors + state.json, replaced atomically
    metrics.jsonl                      one JSON object per evaluation (loss terms, sparsity, held-out PSNR)
    figures/                           atoms of every stage, a reconstruction grid, training curves

Training runs on ``config.device`` (model, optimizer state, batches and held-out evaluation; files are always
written from CPU tensors, so a checkpoint resumes on any device), with batches built by ``DataLoader`` workers
(``csc_serve.training.loader``). Runs under ``torchrun --nproc_per_node N`` (NCCL on CUDA, gloo otherwise):
every process trains on its own batches and gradients are averaged; process 0 alone writes files. SIGINT
or SIGTERM ends the run after the current step with a checkpoint (``csc_serve.training.progress``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from csc_serve.models import CSCAutoencoder, CSCConfig, load_pretrained
from csc_serve.models.images import center_crop
from csc_serve.models.serialization import atomic_write, save_pretrained

from .calibration import move_reconstruction_setting, refine_calibration, sparsest_reconstruction_scale
from .data import ImageFolderDataset, list_images, load_image, split_paths
from .device import autocast, describe_device, init_distributed, resolve_device
from .evaluate import evaluate_images
from .loader import batch_loader
from .progress import CheckpointTimer, StopSignals, Throughput, TrainingInterrupted, agree_on_stop
from .trainer import TrainConfig, Trainer, _world, init_dictionaries

CHECKPOINT = "checkpoint"


def _optimizer_tensors(trainer: Trainer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer states as flat tensors (for safetensors) and their param groups (for JSON)."""
    tensors, groups = {}, {}
    for name, opt in trainer.optimizers.items():
        state = opt.state_dict()
        groups[name] = state["param_groups"]
        for pid, entries in state["state"].items():
            for key, value in entries.items():
                tensors[f"{name}.{pid}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors, groups


def _loop_tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    """What a resumed run needs beyond the model for bit-identical steps: the exact calibration
    parameters and the power-iteration vectors that warm-start the step-size updates."""
    tensors = {"loop.calibration": trainer.calibration.log_scale.detach().cpu().clone()}
    for i, stage in enumerate(trainer.model.stages):
        if stage._power_vector.numel():
            tensors[f"loop.power{i}"] = stage._power_vector.cpu().contiguous()
    return tensors


def _restore_loop(trainer: Trainer, tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        trainer.calibration.log_scale.copy_(tensors["loop.calibration"])
    for i, stage in enumerate(trainer.model.stages):
        if f"loop.power{i}" in tensors:
            stage._power_vector = tensors[f"loop.power{i}"].to(stage.dictionary.device)


def _load_optimizers(trainer: Trainer, tensors: dict[str, torch.Tensor], groups: dict[str, Any]) -> None:
    for name, opt in trainer.optimizers.items():
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            owner, pid, entry = (key.split(".", 2) + ["", ""])[:3]
            if owner == name:
                state.setdefault(int(pid), {})[entry] = value
        opt.load_state_dict({"state": state, "param_groups": groups[name]})


def final_config(trainer: Trainer, extra: dict[str, Any]) -> CSCConfig:
    provenance = {**trainer.model.config.provenance, **extra, "train_config": dataclasses.asdict(trainer.config)}
    return dataclasses.replace(
        trainer.model.config, noise_calibration=trainer.calibration.knots(), provenance=provenance
    )


def save_checkpoint(trainer: Trainer, out: Path) -> None:
    """Write model, optimizer and loop state to a fresh folder, then swap it in for ``checkpoint/``."""
    from safetensors.torch import save_file

    trainer.model.config = final_config(trainer, {"checkpoint_step": trainer.step})
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=out))
    try:
        save_pretrained(trainer.model, tmp / "model")
        tensors, groups = _optimizer_tensors(trainer)
        tensors.update(_loop_tensors(trainer))
        save_file(tensors, tmp / "optimizer.safetensors")
        state = {"step": trainer.step, "param_groups": groups, "history": trainer.history,
                 "train_config": dataclasses.asdict(trainer.config), "train_seconds": round(trainer.seconds(), 1),
                 "lr_factor": trainer.lr_factor, "rollbacks": trainer.guard.rollbacks,
                 "probe_best": trainer.guard.best if math.isfinite(trainer.guard.best) else None}
        (tmp / "state.json").write_text(json.dumps(state))
        final, old = out / CHECKPOINT, out / f".{CHECKPOINT}.old"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# Settings a resumed run may change; any other difference would make it a different run.
RESUMABLE_CHANGES = ("out", "iterations", "checkpoint_every", "eval_every", "eval_images", "figures", "recon_psnr",
                     "device", "bf16", "workers", "checkpoint_minutes", "rollback_every", "rollback_tolerance")


def _check_resumable(state: dict[str, Any], config: TrainConfig) -> None:
    saved = state.get("train_config", {})
    now = dataclasses.asdict(config)
    changed = [k for k in now if k not in RESUMABLE_CHANGES and k in saved and saved[k] != now[k]]
    if changed:
        detail = ", ".join(f"{k}={saved[k]!r}" for k in changed)
        raise ValueError(f"the checkpoint was trained with {detail}: resume with the same settings")
    if state["step"] > config.iterations:
        raise ValueError(f"the checkpoint is at step {state['step']}, past --iterations {config.iterations}")


def find_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (a run killed mid-swap leaves the previous one as ``.checkpoint.old``)."""
    for candidate in (out / CHECKPOINT, out / f".{CHECKPOINT}.old"):
        if (candidate / "state.json").is_file():
            return candidate
    return None


def _holdout_images(paths: list[Path], channels: int, count: int, size: int = 128) -> list[torch.Tensor]:
    images = []
    for path in paths[:count]:
        images.append(center_crop(torch.from_numpy(load_image(path, channels)), size).contiguous())
    return images


def _log(out: Path, record: dict[str, Any]) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def train(
    config: TrainConfig,
    model_config: CSCConfig | None = None,
    init: str | None = None,
    resume: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> Path:
    """Train and write the model to ``config.out``; returns that directory. On SIGINT or SIGTERM, writes a
    checkpoint after the current step and raises ``TrainingInterrupted``. ``command`` (the command line) goes
    into the provenance of a run started from ``init``, whose own provenance is kept under ``"init"``. A run
    from ``init`` starts from the reconstruction setting that model was trained at (undoing its
    ``recon_psnr`` move, ``provenance.reconstruction_scale_factor``) and with its threshold factors rebalanced
    (``CSCAutoencoder.rebalance_thresholds``): the same model, parametrised for the optimizer."""
    device = resolve_device(config.device)  # before anything is written: a missing device leaves no trace
    init_distributed(device)
    rank, world = _world()
    out = Path(config.out)
    paths = list_images(config.data)  # before anything is written: a bad --data leaves no trace
    torch.manual_seed(config.seed)

    checkpoint = find_checkpoint(out) if resume else None
    if resume and checkpoint is None:
        raise FileNotFoundError(f"{out}: no checkpoint to resume from")
    if checkpoint is not None:
        _check_resumable(json.loads((checkpoint / "state.json").read_text()), config)
        model = load_pretrained(checkpoint / "model").train()
    elif init is not None:
        model = load_pretrained(init).train()
        moved = model.config.provenance.get("reconstruction_scale_factor")
        if moved:  # back to the setting it was trained at: lmbda_scale 1 for clean images
            knots = move_reconstruction_setting(model, 1.0 / float(moved))
            model.config = dataclasses.replace(model.config, noise_calibration=knots or None)
        model.rebalance_thresholds()  # the same model, with threshold factors of order 1 for the optimizer
        provenance = {"init": {"model": str(init), **model.config.provenance}}
        if command:
            provenance = {"command": command, **provenance}
        model.config = dataclasses.replace(model.config, provenance=provenance)
    elif model_config is not None:
        model = CSCAutoencoder(model_config).train()
    else:
        raise ValueError("give a model architecture or a model to start from")
    out.mkdir(parents=True, exist_ok=True)

    train_paths, holdout_paths = split_paths(paths, config.holdout_fraction, config.seed)
    channels = model.config.in_channels
    train_set = ImageFolderDataset(train_paths, channels, crop_size=config.crop_size, flips=True, seed=config.seed)
    holdout = _holdout_images(holdout_paths, channels, config.eval_images)
    if checkpoint is None and init is None:
        init_dictionaries(model)
    model.ensure_step_sizes()
    trainer = Trainer(model, config, train_set, [x.to(device) for x in holdout])

    if checkpoint is not None:
        from safetensors.torch import load_file

        state = json.loads((checkpoint / "state.json").read_text())
        tensors = load_file(checkpoint / "optimizer.safetensors")
        _load_optimizers(trainer, tensors, state["param_groups"])
        _restore_loop(trainer, tensors)
        trainer.step, trainer.history = state["step"], state["history"]
        trainer.lr_factor = state.get("lr_factor", 1.0)
        trainer.guard.rollbacks = state.get("rollbacks", 0)
        trainer.guard.best = state.get("probe_best") or math.inf
        trainer.prior_seconds = state.get("train_seconds", state["history"][-1]["seconds"] if state["history"] else 0.0)
    if rank == 0:  # the log restarts from what the checkpoint knows: no lines from steps run twice
        lines = "".join(json.dumps(record) + "\n" for record in trainer.history)
        atomic_write(out / "metrics.jsonl", lambda tmp: Path(tmp).write_text(lines))

    _train_steps(trainer, out, progress)
    if world > 1:
        _check_in_sync(model)
    if rank == 0:
        _write_model(trainer, holdout, {"data": str(config.data), "images": len(paths)})
    if world > 1:
        dist.barrier()
    return out


def _train_steps(trainer: Trainer, out: Path, progress: bool) -> None:
    """Steps ``trainer.step`` .. ``iterations - 1``, with evaluations, checkpoints by steps and by time, and
    a checkpoint then ``TrainingInterrupted`` when a process receives SIGINT or SIGTERM."""
    config, rank, device = trainer.config, trainer.rank, trainer.device
    loader = batch_loader(trainer.batches, trainer.step, config.iterations, config.workers,
                          pin_memory=device.type == "cuda")
    batches = iter(loader) if trainer.step < config.iterations else iter(())
    meter, timer = Throughput(config.batch_size * trainer.world), CheckpointTimer(config.checkpoint_minutes)
    trainer.start_clock()
    bar = tqdm(total=config.iterations, initial=trainer.step, unit="it", disable=not progress or rank != 0)
    try:
        with StopSignals() as signals:
            while trainer.step < config.iterations:
                meter.start()
                batch = next(batches)
                with autocast(device, config.bf16):
                    metrics = trainer.train_step(trainer.step, batch)
                metrics["crops_per_s"] = round(meter.stop(), 1)
                trainer.step += 1
                checked = trainer.guard.after_step(trainer.step)
                if checked.get("rolled_back"):
                    bar.write(f"step {trainer.step}: the probe loss rose to {checked['probe_loss']:.3f} (best "
                              f"{trainer.guard.best:.3f}): back to the last good state, learning rates x"
                              f"{trainer.lr_factor:g}")
                metrics.update(checked, rollbacks=trainer.guard.rollbacks)
                bar.update(1)
                bar.set_postfix(psnr=f"{metrics['train_psnr']:.2f}", zeros=f"{metrics['zero_fraction']:.2f}",
                                crops_s=f"{metrics['crops_per_s']:.0f}")
                last = trainer.step == config.iterations
                if rank == 0 and trainer.holdout and (trainer.step % config.eval_every == 0 or last):
                    record = {"step": trainer.step, "seconds": round(trainer.seconds(), 1), **metrics}
                    record.update(evaluate_holdout(trainer))
                    trainer.history.append(record)
                    _log(out, record)
                stop = agree_on_stop(signals.requested, device)  # all processes stop after the same step
                if rank == 0 and (trainer.step % config.checkpoint_every == 0 or last or stop or timer.due()):
                    save_checkpoint(trainer, out)
                    timer.reset()
                if stop:
                    if trainer.world > 1:
                        dist.barrier()  # the checkpoint of process 0 is complete before any process exits
                    raise TrainingInterrupted(stop, trainer.step, out / CHECKPOINT)
    finally:
        bar.close()
        del batches  # shuts the loader workers down


def _write_model(trainer: Trainer, holdout: list[torch.Tensor], extra: dict[str, Any]) -> None:
    """The final model: converged step sizes, provenance, the reconstruction setting and the calibration
    (searched on the device), then the files from CPU tensors."""
    config, model = trainer.config, trainer.model
    model.update_step_sizes()  # a cold, converged power iteration for the step sizes that ship
    extra = {**extra, "processes": trainer.world, **describe_device(trainer.device), "bf16": config.bf16,
             "torch": torch.__version__, "train_seconds": round(trainer.seconds(), 1)}
    model.config = final_config(trainer, extra)
    if holdout and config.recon_psnr > 0:
        factor = sparsest_reconstruction_scale(model.eval(), trainer.holdout, config.recon_psnr)
        knots = move_reconstruction_setting(model, factor)
        provenance = {**model.config.provenance, "reconstruction_scale_factor": factor}
        model.config = dataclasses.replace(model.config, noise_calibration=knots or None, provenance=provenance)
    if holdout and config.sigma_max > 0:
        knots = refine_calibration(model.eval(), trainer.holdout, seed=config.seed, refine=5)
        model.config = dataclasses.replace(model.config, noise_calibration=knots)
    model.cpu()
    save_pretrained(model, config.out)
    if config.figures:
        from .figures import save_training_figures

        save_training_figures(model, holdout, trainer.history, Path(config.out) / "figures")


def _check_in_sync(model: CSCAutoencoder) -> None:
    """Every process must end with the same dictionaries (gradients were averaged before each update)."""
    checksum = torch.stack([s.dictionary.detach().double().sum() for s in model.stages])
    gathered = [torch.zeros_like(checksum) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, checksum)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError("processes ended with different dictionaries: gradients were not synchronised")


def evaluate_holdout(trainer: Trainer) -> dict[str, float]:
    model = trainer.model
    model.config = dataclasses.replace(model.config, noise_calibration=trainer.calibration.knots())
    model.eval()
    rec = evaluate_images(model, trainer.holdout, "reconstruct")
    den = evaluate_images(model, trainer.holdout, "denoise", sigma=25.0, seed=trainer.config.seed)
    model.train()
    return {"holdout_psnr": rec.psnr, "holdout_zero_fraction": rec.zero_fraction, "holdout_denoise25_psnr": den.psnr}
