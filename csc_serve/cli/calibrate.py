"""``csc calibrate``: fit a model's map from noise level to ``lmbda_scale`` on a folder of images."""

from __future__ import annotations

import argparse
import shlex

from csc_serve.cli.common import add_model_argument, positive_int, refuse_to_overwrite


def _calibrate(args: argparse.Namespace) -> None:
    import dataclasses
    import random
    from pathlib import Path

    import torch

    from csc_serve.model_store import resolve_model
    from csc_serve.models.images import center_crop, list_images, load_image
    from csc_serve.training.calibration import refine_calibration
    from csc_serve.training.evaluate import evaluate_images

    out = Path(args.out)
    refuse_to_overwrite(out, args.force)
    if args.threads:
        torch.set_num_threads(args.threads)
    resolved = resolve_model(args.model)
    model = resolved.module
    if not model.config.noise_calibration:
        raise ValueError(f"{resolved.name} has no noise calibration to refine (train it with noise)")
    paths = list_images(args.data)
    chosen = sorted(random.Random(args.seed).sample(paths, min(args.images, len(paths))))
    channels = model.config.in_channels
    images = [center_crop(torch.from_numpy(load_image(p, channels)), args.crop_size).contiguous() for p in chosen]
    knots = refine_calibration(model, images, seed=args.seed, steps=args.steps, span=args.span, refine=args.refine,
                               progress=not args.quiet)
    before = model.config.noise_calibration
    calibration = {"command": shlex.join(["csc", *args.argv]), "data": str(args.data), "images": len(images),
                   "crop_size": args.crop_size}
    provenance = {**model.config.provenance, "calibration": calibration}
    tuned = dataclasses.replace(model.config, noise_calibration=knots, provenance=provenance)
    print(f"{'sigma':>7} {'lmbda_scale':>12} {'was':>12}  PSNR on the {len(images)} images (dB), was")
    for (sigma, scale), (_, old) in zip(knots, before):
        if sigma == 0:
            print(f"{sigma:7.2f} {scale:12.5g} {old:12.5g}  (reconstruction setting, unchanged)")
            continue
        new_psnr = evaluate_images(model, images, "denoise", sigma=sigma, seed=args.seed, lmbda_scale=scale).psnr
        old_psnr = evaluate_images(model, images, "denoise", sigma=sigma, seed=args.seed, lmbda_scale=old).psnr
        print(f"{sigma:7.2f} {scale:12.5g} {old:12.5g}  {new_psnr:.3f}, was {old_psnr:.3f}")
    model.config = tuned
    model.save_pretrained(out)
    print(f"{out}: written")


def _span(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 1 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number above 1, got {text}")
    return value


def add_calibrate(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "calibrate",
        help="fit the map from noise level to lmbda_scale on a folder of images",
        description="For every knot sigma > 0 of MODEL's noise calibration, add white Gaussian noise of that "
        "sigma (in float, the noise of image i drawn from --seed and i) to central crops of --images images "
        "of --data, and search the lmbda_scale of the best mean PSNR: --steps scales spread over a factor "
        "--span either side of the current one, then --refine steps of golden-section search around the best. "
        "Writes MODEL with the new knots to --out and prints them beside the old ones. Use images the model "
        "will not be tested on.",
    )
    add_model_argument(p)
    p.add_argument("--data", required=True, help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="directory for the calibrated model")
    p.add_argument("--images", type=positive_int, default=32, help="images drawn from --data (default: 32)")
    p.add_argument("--crop-size", type=positive_int, default=160, help="central crop of each image (default: 160)")
    p.add_argument("--steps", type=positive_int, default=7, help="scales of the first search per knot (default: 7)")
    p.add_argument("--span", type=_span, default=1.5,
                   help="the first search spans the current scale divided and multiplied by this (default: 1.5)")
    p.add_argument("--refine", type=int, default=5, choices=range(0, 21), metavar="N",
                   help="golden-section steps after the first search, 0 to 20 (default: 5)")
    p.add_argument("--seed", type=int, default=0, help="draws the images and the noise (default: 0)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--force", action="store_true", help="replace a model already in --out")
    p.set_defaults(run=_calibrate)
