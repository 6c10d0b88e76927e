"""The ``loratune`` command line (see ``loratune --help``)."""

from loratune.cli.main import main

__all__ = ["main"]
