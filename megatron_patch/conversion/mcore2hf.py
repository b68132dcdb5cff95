"""megatron-core (any TP/PP/VP layout) -> HF tensors, streamed in HF order: tensors that are
whole rows of the saved shards are copied file-to-file (rowcopy), the others merged from
their TP shards one full tensor at a time."""
from __future__ import annotations

from tqdm import tqdm

from megatron_patch.checkpoint.load import StateSource, merge_full, saved_layout, source_shards
from megatron_patch.checkpoint.torch_file import LazyTensor, materialize
from megatron_patch.models.llama.arch import LlamaArch

from megatron_patch.models.llama import mapping
from megatron_patch.models.llama.parallel_layout import check_layout
from .rowcopy import Located, plan_blocks


def _located(x):
    if not isinstance(x, LazyTensor):
        return None
    loc = x.file.location(x)
    return None if loc is None else Located(loc[0], loc[1], x.dtype, tuple(x.shape))


def mcore_to_hf(source: StateSource, arch: LlamaArch, writer, progress: bool = True,
                byte_copy: bool = True) -> None:
    """Feed every HF tensor, in ``mapping.hf_tensor_plan`` order, to ``writer.write``."""
    layout = saved_layout(source)
    if layout.num_layers != arch.num_layers:
        raise ValueError(f"the checkpoint holds {layout.num_layers} layers, the model has "
                         f"{arch.num_layers}")
    check_layout(arch, tp=layout.tp)
    rules = mapping.rules_for(arch)
    order = [(r, None) for r in rules if r.stage == "first"]
    order += [(r, i) for i in range(arch.num_layers) for r in rules if r.stage == "layer"]
    order += [(r, None) for r in rules if r.stage == "last"]
    with tqdm(total=len(order), unit="tensor", desc=f"mcore(TP={layout.tp} PP={layout.pp})->hf",
              disable=not progress, dynamic_ncols=True) as bar:
        byte_copy = byte_copy and getattr(writer, "byte_copy", False)
        for rule, layer in order:
            shards = source_shards(source, layout, rule, layer, arch)
            names = mapping.hf_names(rule, layer)

            def to_hf(parts, rule=rule):
                return mapping.unpack(rule, merge_full(rule, parts, arch), arch)

            plans = plan_blocks(to_hf, [_located(x) for x in shards], writer.dtype) \
                if byte_copy else None
            if plans is not None:  # bytes copied from the rank files, no tensor math
                for name, (shape, plan) in zip(names, plans):
                    writer.write_bytes(name, shape, plan)
                del plans
            else:
                for name, t in zip(names, to_hf([materialize(x) for x in shards])):
                    writer.write(name, t)
            del shards
            bar.update(1)
