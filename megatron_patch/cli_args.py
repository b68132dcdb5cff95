"""Argument parsing shared by the command-line tools (standard library only)."""
from __future__ import annotations

import argparse


class OneLineErrors(argparse.ArgumentParser):
    """Bad arguments: a single 'prog: error: ...' line (no usage block), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
