"""Inference on megatron-core Llama models: forward passes at any TP/PP (runner), text
generation (generate: greedy / temperature / top-k / top-p, EOS and stop handling) and an
interactive chat CLI (chat). Checkpoints load through megatron_patch.checkpoint (loading)."""
