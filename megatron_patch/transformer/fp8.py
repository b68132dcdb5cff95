"""FP8 training (PR=fp8): Megatron's ``--fp8-format hybrid`` -- E4M3 for activations and
weights, E5M2 for the gradients flowing back -- through one of two implementations.

- ``te``: Transformer Engine. megatron-core's TE layer spec runs every linear inside TE's
  fp8 autocast with Pai-Megatron-Patch's settings: delayed scaling, amax history 1024,
  scale from the max of that history, margin 0.
- ``torchao``: megatron-core's own ``ColumnParallelLinear``/``RowParallelLinear`` (the local
  spec) compute their matmuls with torchao's float8 training matmul. They are not
  ``nn.Linear``, so torchao's module swap (``convert_to_float8_training``) skips them; we
  replace each layer's ``_forward_impl`` -- the one call through which megatron runs the
  matmul -- keeping megatron's tensor-parallel communication around it (all-reduce of the
  input gradient, or the sequence-parallel all-gather / reduce-scatter). torchao 0.18 has
  dynamic scaling only: every cast takes its scale from the tensor's current amax, so
  Pai's amax history does not apply. On a CPU the float8 matmuls are emulated (inputs
  quantised to float8 and back, fp32 matmul): the numerics of fp8, not its speed.

Without TE, megatron-core's own fp8 switch (``TransformerConfig.fp8``) is a silent no-op, so
the torchao path never sets it. Parameters, optimizer state and checkpoints stay in bf16/fp32
either way: nothing float8 is stored, an fp8 checkpoint loads into a bf16 run and back, and
the converter exports it like any other.
"""
from __future__ import annotations

import functools
import importlib.util
from typing import List, Optional, Sequence

FORMAT = "hybrid"
# Pai-Megatron-Patch's PR=fp8 options for Transformer Engine
TE_RECIPE = dict(fp8=FORMAT, fp8_recipe="delayed", fp8_margin=0, fp8_amax_history_len=1024,
                 fp8_amax_compute_algo="max")
# layers kept in bf16: the output layer (logits), as Transformer Engine recipes do
BF16_LAYERS = ("output_layer",)


class Fp8Unavailable(RuntimeError):
    """PR=fp8 cannot run here; the message is the one line shown to the user."""


# ---- Transformer Engine ----------------------------------------------------------------------
class TransformerEngineFp8:
    name = "te"

    def config_overrides(self) -> dict:
        return dict(TE_RECIPE)

    def prepare_model(self, model) -> List[str]:
        """Nothing to do: the TE layers run fp8 inside megatron-core's fp8 autocast."""
        return []

    def describe(self) -> str:
        r = TE_RECIPE
        return (f"fp8 via Transformer Engine: format {r['fp8']} (E4M3 forward, E5M2 "
                f"gradients), {r['fp8_recipe']} scaling, amax history {r['fp8_amax_history_len']}"
                f", amax algo {r['fp8_amax_compute_algo']}, margin {r['fp8_margin']}; "
                "parameters and checkpoints in bf16")


# ---- torchao ---------------------------------------------------------------------------------
def torchao_missing() -> Optional[str]:
    """None when torchao's float8 training imports, else why not (one line)."""
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed (pip install 'torchao==0.18.*')"
    try:
        _float8()
    except Exception as exc:  # a torchao that does not fit this torch
        return f"`import torchao.float8` failed: {type(exc).__name__}: {exc}"
    return None


def _float8():
    """(torchao.float8, its float8 matmul autograd function). Its import-time warnings about
    kernel libraries a CPU-only torch cannot load are filtered in megatron_patch/__init__."""
    import torchao.float8 as float8
    from torchao.float8.float8_linear import matmul_with_hp_or_float8_args
    return float8, matmul_with_hp_or_float8_args


def float8_config(emulate: bool):
    """torchao's tensorwise recipe, which is the hybrid format: inputs and weights cast to
    E4M3, output gradients to E5M2, one dynamic scale per tensor."""
    float8, _ = _float8()
    return float8.Float8LinearConfig(emulate=emulate)


def _mm_config(config):
    # The per-gemm settings (emulation, fast accumulation) that torchao derives from a
    # Float8LinearConfig, read off a linear converted by its public entry point.
    import torch
    float8, _ = _float8()
    probe = float8.convert_to_float8_training(
        torch.nn.Linear(16, 16, bias=False, device="meta"), config=config)
    return probe.linear_mm_config


def _float8_linear_impl(mm_config, config, input, weight, bias, gradient_accumulation_fusion,
                        allreduce_dgrad, sequence_parallel, grad_output_buffer=None,
                        wgrad_deferral_limit=None, tp_group=None, **_unused):
    """megatron's linear_with_grad_accumulation_and_async_allreduce with the matmul in
    float8: the same tensor-parallel communication, as separate autograd steps."""
    from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                        gather_from_sequence_parallel_region)
    if gradient_accumulation_fusion:
        raise RuntimeError("fp8 via torchao needs gradient_accumulation_fusion=False (the fused "
                           "wgrad kernel would bypass the float8 matmul)")
    if grad_output_buffer is not None:
        raise RuntimeError("fp8 via torchao does not support defer_embedding_wgrad_compute")
    if sequence_parallel:      # all-gather the sequence forward, reduce-scatter the grad back
        input = gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True,
                                                     group=tp_group)
    elif allreduce_dgrad:      # identity forward, all-reduce the input gradient back
        input = copy_to_tensor_model_parallel_region(input, group=tp_group)
    _, matmul = _float8()
    output = matmul.apply(input, weight.t(), mm_config, config)
    if bias is not None:
        output = output + bias
    return output


def route_parallel_linears_to_float8(model, config, skip: Sequence[str] = BF16_LAYERS) -> List[str]:
    """Make every ColumnParallelLinear/RowParallelLinear of ``model`` (except those whose
    name has a part in ``skip``) compute in float8. Returns the names routed. The parameters
    and state dict are untouched; calling it again changes nothing."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    mm_config = _mm_config(config)
    routed = []
    for name, module in model.named_modules():
        if not isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            continue
        if any(part in skip for part in name.split(".")):
            continue
        if module.gradient_accumulation_fusion:
            raise Fp8Unavailable(f"fp8 via torchao: {name} has gradient_accumulation_fusion=True; "
                                 "the fused wgrad kernel would bypass the float8 matmul")
        if not getattr(module, "_mp_float8", False):
            # an instance attribute: megatron's forward calls self._forward_impl(...)
            module._forward_impl = functools.partial(_float8_linear_impl, mm_config, config)
            module._mp_float8 = True
        routed.append(name)
    return routed


class TorchaoFp8:
    name = "torchao"

    def __init__(self, emulate: bool):
        self.emulate = emulate

    def config_overrides(self) -> dict:
        # megatron's fused wgrad accumulation lives inside the autograd function we replace
        return {"gradient_accumulation_fusion": False}

    def prepare_model(self, model) -> List[str]:
        names = route_parallel_linears_to_float8(model, float8_config(self.emulate))
        if not names:
            raise Fp8Unavailable("fp8 via torchao found no megatron parallel linear to route "
                                 "(a Transformer Engine spec?); refusing to run in bf16")
        return names

    def describe(self) -> str:
        how = ("emulated float8 matmuls (fp8 numerics on a CPU, not fp8 speed)" if self.emulate
               else "float8 tensor-core matmuls (torch._scaled_mm)")
        return (f"fp8 via torchao on megatron's parallel linears: format {FORMAT} (E4M3 "
                "activations and weights, E5M2 gradients), dynamic per-tensor scaling (torchao "
                "has no amax history), output layer in bf16, " + how +
                "; parameters and checkpoints in bf16")


def torchao_path(emulate: bool) -> TorchaoFp8:
    why = torchao_missing()
    if why is not None:
        raise Fp8Unavailable(f"PR='fp8' without Transformer Engine needs torchao: {why}")
    return TorchaoFp8(emulate)
