#!/usr/bin/env python
"""Pai-style entry: ``python hf2mcore.py MODEL_SIZE SOURCE TARGET TP PP mg2hf CHECK
CHECK_ONLY PR [HF_CKPT_PATH]`` == ``python -m megatron_patch.conversion.cli`` (the package
is installed by the README's setup)."""
import sys

from megatron_patch.conversion.cli import main

if __name__ == "__main__":
    sys.exit(main())
