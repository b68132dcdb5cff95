#!/usr/bin/env python
"""Pai-style entry: the tool is ``megatron_patch.data.preprocess_cli`` (``python -m megatron_patch.data.preprocess_cli --help``)."""
import sys

from megatron_patch.data.preprocess_cli import main

if __name__ == "__main__":
    sys.exit(main())
