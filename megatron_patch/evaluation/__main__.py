"""lm-eval's command line with the ``megatron_patch`` model type registered.

    python -m megatron_patch.evaluation --model megatron_patch \
        --model_args load=<Megatron ckpt>,tokenizer=<HF tokenizer dir>,tp=1 \
        --tasks mp_tiny_mmlu --include_path LM-Evaluation-Harness/tasks --batch_size 8
    accelerate launch --main_process_port 29051 --multi_gpu --num_processes 2 \
        -m megatron_patch.evaluation --model megatron_patch --model_args load=...,tp=2 ...

Why a module of our own: lm-eval 0.4.13 finds models only in its registry (its own
``lm_eval.models`` table or classes registered in the running process) and loads no plugins,
so ``python -m lm_eval --model megatron_patch`` cannot know our class. This entry registers it
and then runs lm-eval's unchanged CLI (every lm-eval option works; ``--model hf`` too).
Before that it runs megatron_patch.evaluation.preflight (model path, task names, offline
task data) so a mistake ends in one line, from rank 0 only.
"""
from __future__ import annotations

import os
import sys

MODEL_NAME = "megatron_patch"
TARGET = "megatron_patch.evaluation.lm_model:MegatronPatchLM"


def register() -> None:
    """Add ``megatron_patch`` to lm-eval's model registry (lazily: the class and torch load
    only when the model is used). Idempotent."""
    import lm_eval.models  # noqa: F401  (lm-eval's own table first: get_model only
    #                        imports it while the registry is empty)
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=TARGET)


def _preflight(argv) -> int:
    """Model path, task names and offline task data checked before lm-eval starts
    (MP_EVAL_SKIP_PREFLIGHT=1 skips it, e.g. for task folders the check cannot read)."""
    if os.environ.get("MP_EVAL_SKIP_PREFLIGHT") == "1":
        return 0
    from megatron_patch.evaluation import preflight
    try:
        preflight.run(argv)
    except preflight.PreflightError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    is_run = not argv or argv[0] not in ("ls", "validate") and "-h" not in argv and \
        "--help" not in argv
    if is_run and ("--tasks" in argv or any(a.startswith("--tasks=") for a in argv)):
        rc = _preflight(argv[1:] if argv and argv[0] == "run" else argv)
        if rc:
            return rc
    register()
    from lm_eval.__main__ import cli_evaluate
    sys.argv = ["lm-eval"] + argv
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
