"""What several ``csc`` commands share: the model argument and small argument types."""

from __future__ import annotations

import argparse

MODEL_HELP = "bundled model name, model directory or model-store tag (NAME:VERSION or NAME:latest)"


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """The positional MODEL, resolved by ``csc_serve.model_store`` (the same way for every command)."""
    parser.add_argument("model", metavar="MODEL", help=MODEL_HELP)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text}")
    return value


def refuse_to_overwrite(out, force: bool) -> None:
    """A one-line error when ``out`` already holds a model and ``force`` is not set."""
    from pathlib import Path

    if (Path(out) / "config.json").exists() and not force:
        raise ValueError(f"{out} already holds a model (pass --force to replace it)")
