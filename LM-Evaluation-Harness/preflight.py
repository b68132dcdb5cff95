#!/usr/bin/env python
"""The checks run_eval.sh makes before lm-eval starts; the code is
megatron_patch.evaluation.preflight (``python -m megatron_patch.evaluation.preflight``)."""
import sys

from megatron_patch.evaluation.preflight import main

if __name__ == "__main__":
    sys.exit(main())
