"""``csc train``: a CSC-CTRL model from a folder of images, on one process or under torchrun."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
from pathlib import Path

HELP_TRAIN = {
    "crop_size": "side of the random training crops, in pixels",
    "batch_size": "crops per step (per process under torchrun)",
    "iterations": "number of training steps",
    "lr": "Adam learning rate of the dictionaries",
    "lr_calibration": "Adam learning rate of the sigma -> lmbda_scale map",
    "lr_thresholds": "Adam learning rate of the per-atom weights of the l1 penalty (0 keeps them at 1)",
    "lr_final": "learning rates decay (cosine) to this fraction of their start at the last step",
    "seed": "seed of crops, flips, noise and the held-out split",
    "holdout_fraction": "fraction of the images held out for evaluation",
    "sigma_max": "largest training noise std (0..255 scale); 0 trains without noise",
    "clean_fraction": "fraction of crops trained without noise",
    "calibration_knots": "knots of the learned sigma -> lmbda_scale map",
    "pixel_weight": "weight of the pixel reconstruction term",
    "rate_weight": "weight of the rate-reduction terms of the CTRL game (0: pixel loss only)",
    "rate_batch": "samples of each batch that enter the rate terms (each costs one more encoding)",
    "eps": "distortion eps of the coding rate",
    "power_iters": "warm power-iteration steps per update for the FISTA step size",
    "checkpoint_every": "steps between checkpoints",
    "eval_every": "steps between held-out evaluations (metrics.jsonl)",
    "eval_images": "held-out images evaluated (128x128 centre crops)",
    "alternate": "alternate encoder and decoder updates (1) instead of moving both players at once (0)",
    "figures": "write figures at the end (0 or 1)",
    "recon_psnr": "after training, make lmbda_scale 1 the sparsest setting whose held-out reconstruction PSNR "
                  "(dB) reaches this, leaving the denoising thresholds at the calibration knots unchanged (0: keep the "
                  "trained setting)",
    "device": "where to train: auto (cuda if available, else mps, else cpu), cpu, cuda, cuda:N or mps; under "
              "torchrun with cuda each process uses cuda:LOCAL_RANK and the processes talk over NCCL",
    "bf16": "forward pass and loss in bfloat16 autocast (1); parameters, optimizer state, step sizes and the "
            "rate-reduction logdet stay float32",
    "workers": "DataLoader worker processes that crop and add noise (0: in the training process); the default, "
               "min(4, CPUs - 1), leaves one core to training. Batches are the same for any number",
    "checkpoint_minutes": "also write a checkpoint whenever this many minutes of training passed since the last "
                          "one (0: only every --checkpoint-every steps). Ctrl-C or SIGTERM always writes one after "
                          "the current step and exits (130 or 143); --resume continues from it",
    "rollback_every": "steps between probes of a fixed noisy held-out batch; a probe worse than the best so far by "
                      "more than --rollback-tolerance returns training to the last good probe's state with halved "
                      "learning rates (0: never probe)",
    "rollback_tolerance": "how much worse (mean log MSE; 0.25 is about 1.1 dB) a probe may be before training rolls "
                          "back",
    "train_shifts": "grid shifts of a shift-averaged model averaged in each training step (1: the grid as it is; "
                    "up to stride^2): trains the mean that reconstruct and denoise serve, at that many encodings "
                    "per crop",
}


def _train(args: argparse.Namespace) -> None:
    import torch

    from csc_serve.model_store import is_store_reference, resolve_source
    from csc_serve.models import CSCConfig
    from csc_serve.training.presets import PRESETS
    from csc_serve.training.progress import TrainingInterrupted
    from csc_serve.training.run import train
    from csc_serve.training.trainer import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name not in ("data", "out")}
    config = TrainConfig(data=args.data, out=args.out, **fields)
    arch = None
    if args.arch:
        try:
            arch = CSCConfig.from_dict(json.loads(Path(args.arch).read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{args.arch}: {err}") from None
    elif not args.init and not args.resume:
        arch = PRESETS[args.preset]
    command = " ".join(["csc", *args.argv])
    if arch is not None:
        arch = dataclasses.replace(arch, provenance={"command": command})
    init = args.init
    if init and is_store_reference(init):  # a model-store tag: start from the stored directory
        init = str(resolve_source(init).directory)
    try:
        out = train(config, model_config=arch, init=init, resume=args.resume, command=command)
    except TrainingInterrupted as stop:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"csc train: {stop}; resume with: {_resume_command(args)}", file=sys.stderr)
        raise SystemExit(stop.exit_code) from None
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line rather than one per process
        print(f"model written to {out}")


def _resume_command(args: argparse.Namespace) -> str:
    """The command that continues this run: the same arguments with ``--resume`` (under torchrun, pass
    them to the same torchrun command)."""
    argv = args.argv if args.argv[:1] == ["train"] else ["train", "--data", args.data, "--out", args.out]
    command = shlex.join(["csc", *argv, *([] if "--resume" in argv else ["--resume"])])
    return command + (" (through the same torchrun command)" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "")


def add_train(commands: argparse._SubParsersAction) -> None:
    from csc_serve.training.presets import PRESETS

    p = commands.add_parser(
        "train",
        help="train a CSC-CTRL model on a folder of images",
        description="Train a CSC autoencoder with the closed-loop rate-reduction game and noisy inputs "
        "(robust training), learning the map from noise level to threshold scale. Writes the model "
        "(config.json + model.safetensors), checkpoint/, metrics.jsonl and figures/ into --out. "
        "Trains on a GPU with --device cuda (add --bf16 for bfloat16 autocast), and on several with "
        "'torchrun --standalone --nproc_per_node N -m csc_serve.cli train --device cuda ...' (NCCL; gloo on CPU). "
        "Ctrl-C or SIGTERM stops after the current step with a checkpoint; --resume continues exactly.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, help="folder of training images (PNG, JPEG, BMP, TIFF)")
    p.add_argument("--out", required=True, help="output model directory")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--preset", choices=sorted(PRESETS), default="csc-ctrl-rgb", help="starting architecture")
    start.add_argument("--arch", help="architecture JSON (the 'architecture' object of a config.json)")
    start.add_argument("--init",
                       help="start from this trained model (bundled name, model directory or model-store tag); a "
                       "model whose lmbda_scale 1 was moved by --recon-psnr starts from the setting it was trained at")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    from csc_serve.training.trainer import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        if f.name in ("data", "out"):
            continue
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(f.default, bool):  # 0 or 1; the bare flag means 1
            p.add_argument(flag, dest=f.name, type=int, nargs="?", const=1, default=f.default, metavar="{0,1}",
                           help=HELP_TRAIN[f.name])
        else:
            p.add_argument(flag, dest=f.name, type=type(f.default), default=f.default, help=HELP_TRAIN[f.name])
    p.set_defaults(run=_train)
