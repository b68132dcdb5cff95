"""Thin entry for Pai-style tooling: ``python hf2mcore.py MODEL_SIZE SOURCE TARGET TP PP
mg2hf CHECK CHECK_ONLY PR [HF_CKPT_PATH]`` == ``python -m megatron_patch.conversion.cli``."""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..")))

from megatron_patch.conversion.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
