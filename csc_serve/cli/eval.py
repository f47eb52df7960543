"""``csc eval``: mean PSNR and code sparsity of a model on a folder of images, reconstructing or denoising."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from csc_serve.cli.common import add_model_argument


def _eval(args: argparse.Namespace) -> None:
    import torch

    from csc_serve.model_store import resolve_model
    from csc_serve.models.images import list_images, load_image
    from csc_serve.training.evaluate import evaluate_images

    if args.threads:
        torch.set_num_threads(args.threads)
    resolved = resolve_model(args.model)
    model = resolved.module
    paths = list_images(args.data)
    if args.holdout:
        from csc_serve.training.data import split_paths

        paths = split_paths(paths, args.holdout, args.split_seed)[1]
    paths = paths[: args.limit or None]
    images = [torch.from_numpy(load_image(p, model.config.in_channels)) for p in paths]
    result = evaluate_images(
        model, images, args.task, sigma=args.sigma, seed=args.seed, blind=args.blind,
        lmbda_scale=args.lmbda_scale, progress=True,
    )
    print(result.summary())
    if args.json:
        record = dataclasses.asdict(result) | {"model": resolved.name, "data": str(args.data), "seed": args.seed}
        from csc_serve.models.serialization import atomic_write

        text = json.dumps(record, indent=2)
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(text))


def add_eval(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "eval",
        help="mean PSNR and code sparsity on a folder of images",
        description="Reconstruct or denoise every image of --data and print the mean PSNR (dB, peak 1) and the "
        "fraction of zero last-stage codes. Denoising adds white Gaussian noise of std sigma/255 in float to "
        "images in [0, 1], without clipping or rounding, and uses the model's calibrated threshold scale for "
        "sigma (or for its own estimate of the noise with --blind).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_argument(p)
    p.add_argument("--data", required=True, help="folder of images")
    p.add_argument("--task", choices=("reconstruct", "denoise"), default="reconstruct")
    p.add_argument("--sigma", type=float, default=25.0, help="noise std on the 0..255 scale (denoise)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--blind", action="store_true", help="estimate the noise level instead of using --sigma")
    p.add_argument(
        "--lmbda-scale", type=float, default=None, help="fixed threshold scale instead of the calibrated one"
    )
    p.add_argument(
        "--holdout", type=float, default=0.0, metavar="FRACTION",
        help="evaluate only the images that 'csc train --holdout-fraction FRACTION --seed SPLIT_SEED' holds out of "
        "--data (never trained on; 0: every image)",
    )
    p.add_argument("--split-seed", type=int, default=0, help="the training seed of the --holdout split")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N images (0: all)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", help="also write the result, per image, to this JSON file")
    p.set_defaults(run=_eval)
