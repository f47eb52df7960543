"""The ``csc`` command line: ``main`` parses, one module per command does the work."""

from csc_serve.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
