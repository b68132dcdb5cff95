"""Megatron-style per-iteration log line, TensorBoard scalars and model FLOPs."""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Optional


def model_flops_per_token(arch, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward), counting matmuls only,
    attention over the full (not causal-halved) sequence like Megatron-LM's formula and
    activation recomputation not counted (model FLOPs, not hardware FLOPs)."""
    h, ffn, L = arch.hidden_size, arch.ffn_hidden_size, arch.num_layers
    hd, heads, kv = arch.head_dim, arch.num_attention_heads, arch.num_key_value_heads
    per_layer = (h * (heads + 2 * kv) * hd      # qkv
                 + heads * hd * h              # proj
                 + 3 * h * ffn)                # gate, up, down
    attention = 2 * seq_len * heads * hd       # scores + context, per token per layer
    forward = 2 * (L * per_layer + h * arch.vocab_size) + 2 * L * attention
    return 3.0 * forward


class TrainLogger:
    """Writes on the logging rank only (the last rank, which holds the loss)."""

    def __init__(self, enabled: bool, tensorboard_dir: Optional[str] = None,
                 log_file: Optional[str] = None):
        self.enabled = enabled
        self.writer = None
        self.file = None
        if not enabled:
            return
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
                os.makedirs(tensorboard_dir, exist_ok=True)
                self.writer = SummaryWriter(log_dir=tensorboard_dir, max_queue=1000)
            except ImportError as exc:
                self.print(f"note: TensorBoard logging off ({exc}); pip install tensorboard")
        if log_file:
            os.makedirs(os.path.dirname(log_file), exist_ok=True)
            self.file = open(log_file, "a", encoding="utf-8")

    def print(self, line: str) -> None:
        if not self.enabled:
            return
        print(line, flush=True)
        if self.file is not None:
            self.file.write(line + "\n")
            self.file.flush()

    def scalars(self, step: int, values: dict, samples: Optional[int] = None) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if v is None:
                continue
            self.writer.add_scalar(k, v, step)
            if samples is not None and k in ("lm loss", "learning-rate", "loss-scale",
                                             "grad-norm", "lm loss validation"):
                self.writer.add_scalar(f"{k} vs samples", v, samples)

    def flush(self):
        if self.writer is not None:
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.file is not None:
            self.file.close()
            self.file = None


def timestamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def iteration_line(it: int, train_iters: int, consumed_samples: int, consumed_tokens: int,
                   elapsed_ms: float, lr: float, gbs: int, loss: Optional[float],
                   loss_scale: float, grad_norm: Optional[float], skipped: int, nan: int,
                   tokens_per_s_dev: float, tflops_dev: float) -> str:
    width = len(str(train_iters))
    parts = [f" [{timestamp()}] iteration {it:>{width}}/{train_iters}",
             f"consumed samples: {consumed_samples:>10d}",
             f"consumed tokens: {consumed_tokens:>12d}",
             f"elapsed time per iteration (ms): {elapsed_ms:.1f}",
             f"learning rate: {lr:.6E}",
             f"global batch size: {gbs:>5d}",
             f"lm loss: {loss:.6E}" if loss is not None and math.isfinite(loss)
             else f"lm loss: {loss}",
             f"loss scale: {loss_scale:.1f}",
             f"grad norm: {grad_norm:.3f}" if grad_norm is not None else "grad norm: -",
             f"number of skipped iterations: {skipped:>3d}",
             f"number of nan iterations: {nan:>3d}",
             f"tokens per second per device: {tokens_per_s_dev:.1f}",
             f"throughput per device (TFLOP/s): {tflops_dev:.3f}"]
    return " | ".join(parts) + " |"


def stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
