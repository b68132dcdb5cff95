"""Two repairs of megatron-core 0.16.1's optimizer CPU offload that every backend needs.

1. ``OptimizerConfig`` with ``use_precision_aware_optimizer`` (what keeps bf16/fp16 runs'
   fp32 main weights off the device when offloading) asks ``is_te_min_version("2.1.0")``,
   which raises TypeError without Transformer Engine (``None >= Version``). Without TE the
   answer is "no": it returns False there (store_param_remainders then stays off, which the
   host optimizer needs anyway).
2. ``DistributedOptimizer`` hands fp32 parameters to its inner optimizer as views of the model
parameters (``model_param.view(-1)[start:end]``): non-leaf tensors, which the plain torch
Adam accepts because megatron assigns its ``param_groups`` directly, but which
``HybridDeviceOptimizer`` (OPTIMIZER_OFFLOAD) passes through ``torch.optim.Optimizer``'s
constructor -- "can't optimize a non-leaf Tensor" for every PR=fp32 run. The wrapper below
detaches those views (same storage, same tensor-parallel attributes), for the hybrid
optimizer only, before the distributed optimizer builds it.

The cpu backend adds what a host-only machine needs on top (backends/cpu.py).
"""
from __future__ import annotations

import functools

TE_VERSION_CHECK = "megatron.core.optimizer.optimizer_config.is_te_min_version"
TARGET = ("megatron.core.optimizer.distrib_optimizer.DistributedOptimizer."
          "_build_model_and_main_param_groups")


def leaf_fp32_shards(build):
    """Wrap the classmethod DistributedOptimizer._build_model_and_main_param_groups."""
    @functools.wraps(build)
    def wrapper(cls, gbuf_ranges, param_gbuf_map, opt_group_ranges, config):
        from megatron.core import tensor_parallel
        groups = build(cls, gbuf_ranges, param_gbuf_map, opt_group_ranges, config)
        if not config.optimizer_cpu_offload:  # the hybrid optimizer is built from these
            return groups
        model_fp32_groups, shard_fp32_groups = groups[1], groups[3]
        leaves = {}
        for model_group, shard_group in zip(model_fp32_groups, shard_fp32_groups):
            for i, (model_param, shard) in enumerate(zip(model_group, shard_group)):
                if shard.is_leaf:
                    continue
                leaf = shard.detach()
                tensor_parallel.copy_tensor_model_parallel_attributes(leaf, model_param)
                if hasattr(model_param, "shared"):
                    leaf.shared = model_param.shared
                shard_group[i] = leaves[id(shard)] = leaf
        for group_range in opt_group_ranges:
            orig = group_range["orig_group"]
            orig["params"] = [leaves.get(id(p), p) for p in orig["params"]]
        return groups
    wrapper.__wrapped_by_megatron_patch__ = True
    return wrapper


def te_version_or_false(check):
    """Wrap is_te_min_version: False when Transformer Engine is not installed."""
    @functools.wraps(check)
    def wrapper(version, check_equality=True):
        from megatron.core.utils import get_te_version
        if get_te_version() is None:
            return False
        return check(version, check_equality)
    wrapper.__wrapped_by_megatron_patch__ = True
    return wrapper


def register(registry, inner=None) -> None:
    """Register the repair; ``inner``: a wrapper the backend needs on the same function
    (applied first -- a registry holds one patch per target)."""
    wrap = leaf_fp32_shards if inner is None else (lambda f: leaf_fp32_shards(inner(f)))
    registry.register(TARGET, wrapper=wrap,
                      reason="fp32 shards are non-leaf views: HybridDeviceOptimizer rejects them")
    registry.register(TE_VERSION_CHECK, wrapper=te_version_or_false,
                      reason="precision-aware optimizer config raises TypeError without TE")
