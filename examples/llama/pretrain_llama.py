"""Pai-Megatron-Patch's training entry name; the code is megatron_patch.training.pretrain
(run_mcore_llama.sh starts that module directly under torchrun)."""
import sys

from megatron_patch.training.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
