"""Build a megatron-core Llama at this rank's (TP, PP) position and fill it from a Megatron
checkpoint directory (any saved TP/PP: megatron_patch.checkpoint re-shards as needed).

Where the architecture comes from (first found): ``model_size=`` (a preset such as
``llama3_1-8B``), ``hf_config=`` (a config.json or HF folder), the checkpoint itself (its
``args`` as written by megatron_patch, or the config.json the converter puts next to it).
"""
from __future__ import annotations

import os
from typing import Optional

from megatron_patch.models.llama.arch import LlamaArch
from megatron_patch.models.llama.resolve import ArchError
from megatron_patch.models.llama.resolve import resolve_arch as shared_resolve_arch


class CheckpointError(FileNotFoundError):
    """The checkpoint path is wrong or incomplete; the message says what was expected."""


def find_checkpoint(load: str):
    """The checkpoint megatron_patch.checkpoint would read, or CheckpointError."""
    from megatron_patch.checkpoint import find_checkpoint as _find

    if not load or not os.path.isdir(load):
        raise CheckpointError(f"checkpoint directory not found: {load}")
    try:
        return _find(load)
    except (FileNotFoundError, ValueError) as e:
        hint = ""
        names = os.listdir(load)
        if "config.json" in names and any(n.endswith((".safetensors", ".bin")) for n in names):
            hint = " (this is an HF model directory; convert it with hf2mcore, or use it " \
                   "with lm-eval's --model hf)"
        raise CheckpointError(f"not a Megatron checkpoint: {e}{hint}") from None


def resolve_arch(load: Optional[str] = None, hf_config: Optional[str] = None,
                 model_size: Optional[str] = None) -> LlamaArch:
    """The model to build (models.llama.resolve: a preset, an HF config.json, or the
    config.json next to the checkpoint; a preset must agree with the config)."""
    if load and not hf_config:
        find_checkpoint(load)  # a wrong path is a CheckpointError before anything else
    try:
        return shared_resolve_arch(model_size, hf_config=hf_config, checkpoint=load,
                                   size_name="model_size")
    except ArchError as e:
        raise CheckpointError(f"cannot tell the model architecture: {e}; pass hf_config="
                              "<HF folder or config.json> or model_size=<e.g. llama3_1-8B>") \
            from None


def build_model(arch: LlamaArch, precision: str = "fp32"):
    """The model chunk of this rank (parallel state must be initialised), on the device."""
    from megatron.core import parallel_state

    from megatron_patch.backends import active_backend
    from megatron_patch.models.llama.config import ParallelSettings, transformer_config
    from megatron_patch.models.llama.provider import build_llama

    par = ParallelSettings(tp=parallel_state.get_tensor_model_parallel_world_size(),
                           pp=parallel_state.get_pipeline_model_parallel_world_size())
    config = transformer_config(arch, par, precision)
    device = active_backend().device(int(os.environ.get("LOCAL_RANK", 0)))
    return build_llama(arch, config).to(device).eval()


def load_model(load: str, arch: LlamaArch, precision: str = "fp32"):
    """Build this rank's chunk and fill it from ``load`` (any saved TP/PP)."""
    from megatron_patch.checkpoint import load_model_shards

    find_checkpoint(load)  # clear error before building anything
    model = build_model(arch, precision)
    try:
        load_model_shards(load, model, arch=arch)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{load} does not fit the model ({e}); wrong hf_config / "
                              "model_size?") from None
    return model


def model_from_hf_state(hf_state: dict, arch: LlamaArch, precision: str = "fp32"):
    """This rank's chunk filled from an in-memory HF state dict (tests, quick checks)."""
    from megatron.core import parallel_state

    from megatron_patch.checkpoint import load_into
    from megatron_patch.models.llama import mapping

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    model = build_model(arch, precision)
    state = mapping.hf_to_mcore_state(
        hf_state, arch, tp, parallel_state.get_tensor_model_parallel_rank(),
        layers=mapping.stage_layers(arch.num_layers, pp, pp_rank), first=pp_rank == 0,
        last=pp_rank == pp - 1)
    load_into(model, state)
    return model
