"""Argument parsing shared by the command-line tools (standard library only)."""
from __future__ import annotations

import argparse
import os


class OneLineErrors(argparse.ArgumentParser):
    """Bad arguments: a single 'prog: error: ...' line (no usage block), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def check_output_path(parser: argparse.ArgumentParser, flag: str, path: str,
                      is_file: bool = True) -> None:
    """Refuse, before any work, an output path that cannot be written: one under an
    existing file (a file where a directory must be), or a directory where a file is
    wanted (``is_file``)."""
    up = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(up):
        up = os.path.dirname(up)
    if not os.path.isdir(up):
        parser.error(f"{flag} {path}: {up} is a file, not a directory; choose another path")
    if is_file and os.path.isdir(path):
        parser.error(f"{flag} {path} is a directory: give a file name")
