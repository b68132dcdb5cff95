"""lm-eval resolves `!function utils.load` next to the YAML: the loader is
megatron_patch.evaluation.task_data (written by ../generate_configs.py)."""
from megatron_patch.evaluation.task_data import load  # noqa: F401
