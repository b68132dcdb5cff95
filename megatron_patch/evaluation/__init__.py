"""Evaluation: the ``megatron_patch`` lm-eval model type (mcore checkpoints evaluated directly
at any TP/PP) and helpers. ``python -m megatron_patch.evaluation`` is lm-eval's CLI with the
model type registered."""
