"""The ``csc`` command line: builds the parser from one module per command, runs the chosen one, and turns
bad input into one line on stderr and exit status 1."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from csc_serve import __version__
from csc_serve.cli.bench import add_bench
from csc_serve.cli.calibrate import add_calibrate
from csc_serve.cli.eval import add_eval
from csc_serve.cli.export import add_export
from csc_serve.cli.extract import add_extract
from csc_serve.cli.grow import add_grow
from csc_serve.cli.import_model import add_import
from csc_serve.cli.train import add_train
from csc_serve.cli.viz import add_viz

DESCRIPTION = """\
Train, export and serve convolutional sparse coding (CSC-CTRL) autoencoders.

A model is a directory holding config.json and model.safetensors, the name of a
bundled model, or a BentoML model-store tag (NAME:VERSION or NAME:latest, as
'csc import' prints). Run 'csc COMMAND --help' for each command's options."""


COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    add_train, add_grow, add_calibrate, add_eval, add_export, add_bench, add_extract, add_import, add_viz
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="csc", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"csc-serve {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line, for provenance and messages
    try:
        args.run(args)
    except KeyboardInterrupt:
        print("csc: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if not isinstance(err, _user_errors()):
            raise
        print(f"csc {args.run.__name__.lstrip('_')}: error: {err}", file=sys.stderr)  # one line, no traceback
        return 1
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that describe bad input or a missing runtime, not a bug (their modules are loaded by then)."""
    errors: list[type[BaseException]] = [ValueError, OSError]
    optional = (("csc_serve.backends.base", "BackendUnavailable"), ("csc_serve.export.onnx_export", "ExportError"))
    for module, name in optional:
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


if __name__ == "__main__":
    sys.exit(main())
