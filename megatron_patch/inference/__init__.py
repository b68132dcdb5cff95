"""Inference on megatron-core Llama models: forward passes at any TP/PP (runner), generation
with megatron-core's KV cache in batches (engine) or by full recompute (recompute, the
reference), the sampling rule both share (sampling), the generate and chat CLIs, and an
OpenAI-compatible HTTP server (server, openai_protocol, scheduler, text_stream).
Checkpoints load through megatron_patch.checkpoint (loading). Design: docs/inference.md."""
