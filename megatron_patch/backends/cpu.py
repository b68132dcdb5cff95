"""cpu backend: real megatron-core on the CPU, process groups over gloo.

megatron-core 0.16.1 assumes CUDA in three ways; each patch below names its target and why:
1. ``torch.cuda.current_device()`` chooses the device of ~60 allocations (rotary tables,
   TP gather buffers, p2p buffers, DDP grad buffers): it answers the CPU device here.
   ``torch.cuda.synchronize()`` (after batched p2p) is a no-op.
2. The model-parallel RNG tracker (dropout, init, activation recompute) saves/restores the
   CUDA generator: back it with the CPU generator.
3. Literal ``device="cuda"`` / ``.cuda()`` / ``'torch.cuda.FloatTensor'`` in specific
   functions: those functions run under CudaToCpuMode (see cuda_to_cpu.py).
4. The optimizer CPU offload (``HybridDeviceOptimizer``, OPTIMIZER_OFFLOAD) overlaps its
   copies on CUDA streams and offloads only parameters that are ``is_cuda``: its stream
   calls get host stand-ins, and every parameter counts as a device parameter (the host is
   the device), so the offloaded fraction takes the same copy/step/copy-back path as on a GPU.
gloo in torch 2.13 implements every collective megatron calls here (all_gather_into_tensor,
reduce_scatter_tensor, bf16/fp16 all_reduce): tests/test_gloo_collectives.py checks their
results against the definitions, so nothing needs emulating.
"""
from __future__ import annotations

import torch

from . import offload_fixes
from .base import Backend
from .cuda_to_cpu import on_cpu, on_host_streams

_CPU = torch.device("cpu")

# functions that allocate with device="cuda" or check CUDA type names
_CUDA_LITERAL_FUNCTIONS = [
    "megatron.core.transformer.utils.get_default_causal_mask",
    "megatron.core.transformer.utils.get_sliding_window_causal_mask",
    "megatron.core.optimizer.optimizer.MixedPrecisionOptimizer.__init__",
    "megatron.core.optimizer.optimizer.Float16OptimizerWithFloat16Params.__init__",
    "megatron.core.optimizer.optimizer.FP32Optimizer.__init__",
    "megatron.core.optimizer.optimizer.MegatronOptimizer.restore_from_cpu",
    "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer.__init__",
    "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer._build_model_and_main_param_groups",
    "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer.get_parameter_state_dp_zero",
    "megatron.core.optimizer.clip_grads.get_grad_norm_fp32",
    "megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32",
    "megatron.core.optimizer.clip_grads.count_zeros_fp32",
    # optimizer.py imported the three above by name
    "megatron.core.optimizer.optimizer.get_grad_norm_fp32",
    "megatron.core.optimizer.optimizer.clip_grad_by_total_norm_fp32",
    "megatron.core.optimizer.optimizer.count_zeros_fp32",
    "megatron.core.optimizer.clip_grads.l2_norm_impl",
    "megatron.core.optimizer.grad_scaler.MegatronGradScaler.__init__",
    "megatron.core.optimizer.grad_scaler.DynamicGradScaler.__init__",
    "megatron.core.optimizer.grad_scaler.DynamicGradScaler.load_state_dict",
    "megatron.core.pipeline_parallel.schedules.forward_backward_no_pipelining",
    "megatron.core.pipeline_parallel.schedules.forward_backward_pipelining_without_interleaving",
    "megatron.core.pipeline_parallel.schedules.forward_backward_pipelining_with_interleaving",
    # context parallelism: the rank's rotary rows are picked with a pinned index moved to
    # cuda; rotary_pos_embedding imported the function by name
    "megatron.core.models.common.embeddings.rope_utils.get_pos_emb_on_this_cp_rank",
    "megatron.core.models.common.embeddings.rotary_pos_embedding.get_pos_emb_on_this_cp_rank",
]


def _no_jit_fuser(func):
    """megatron.core.jit.jit_fuser on CPU: leave the function as it is."""
    return func


def _current_device():
    return _CPU


def _synchronize(device=None):
    return None


def _get_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _tracker_add(self, name, seed):
    """CudaRNGStatesTracker.add with the CPU generator (same bookkeeping as the original)."""
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"cuda rng state {name} already exists")
    orig = torch.get_rng_state()
    torch.manual_seed(seed)
    self.states_[name] = torch.get_rng_state()
    torch.set_rng_state(orig)


# Pipeline p2p: megatron posts send_prev/recv_prev/send_next/recv_next with one tag. With
# PP=2 (and the interleaved ring) "prev" and "next" are the same peer, and gloo matches
# messages per (peer, tag) in posting order: when one side posts a gradient and an activation
# in separate calls while the other posts both receives in one call, the activation lands in
# the gradient buffer (seen: wrong losses with VPP; tests/test_pipeline_p2p_tags.py posts
# exactly that order). Tag each direction: forward-going messages (send_next/recv_prev) and
# backward-going ones (send_prev/recv_next) never mix.
# megatron-core's P2PCommunicator passes GLOBAL ranks (dist.get_global_rank of the pipeline
# peers), as isend/irecv expect: pass them through unchanged.
_TAG_FWD, _TAG_BWD = 1, 2


def _tagged_p2p(*, tensor_send_prev, tensor_recv_prev, tensor_send_next, tensor_recv_next,
                group, prev_pipeline_rank, next_pipeline_rank):
    import torch.distributed as dist
    reqs = {}
    if tensor_send_next is not None:
        reqs["send_next"] = dist.isend(tensor_send_next, next_pipeline_rank, group, tag=_TAG_FWD)
    if tensor_recv_prev is not None:
        reqs["recv_prev"] = dist.irecv(tensor_recv_prev, prev_pipeline_rank, group, tag=_TAG_FWD)
    if tensor_send_prev is not None:
        reqs["send_prev"] = dist.isend(tensor_send_prev, prev_pipeline_rank, group, tag=_TAG_BWD)
    if tensor_recv_next is not None:
        reqs["recv_next"] = dist.irecv(tensor_recv_next, next_pipeline_rank, group, tag=_TAG_BWD)
    return reqs


def _tagged_batched_p2p(**kwargs):
    return list(_tagged_p2p(**kwargs).values())


_HYBRID = "megatron.core.optimizer.cpu_offloading.hybrid_optimizer.HybridDeviceOptimizer"


def _split_params_host_is_device(self, offload_fraction):
    """HybridDeviceOptimizer._get_sub_optimizer_param_groups with the host as the device.

    megatron-core offloads only ``param.is_cuda`` parameters and leaves the others out of
    its host-copy maps, which then fail with KeyError at the first step. Here every
    parameter is a device parameter: the first ``offload_fraction`` of them (by element
    count, in parameter-group order -- megatron-core's rule) get a separate host copy that
    the host optimizer steps and that is copied back after each step; the rest are stepped
    in place by the device optimizer. Returns megatron-core's five values: host groups,
    device groups, device param -> host copy, host copy -> device param, param -> fp32 copy.
    """
    params = [p for group in self.param_groups for p in group["params"]]
    threshold = sum(p.numel() for p in params) * offload_fraction
    offloaded = 0
    host_groups, device_groups = [], []
    to_host, to_device, to_fp32 = {}, {}, {}
    for group in self.param_groups:
        host_group, device_group = dict(group, params=[]), dict(group, params=[])
        for param in group["params"]:
            inner, offload = param, offloaded < threshold
            if offload:
                inner = param.detach().clone()   # pinned on a GPU machine; no pinning here
                offloaded += param.numel()
            if self.param_update_in_fp32 and inner.dtype != torch.float32:
                inner = inner.detach().clone().float()
                to_fp32[param] = inner
            if offload:
                to_host[param], to_device[inner] = inner, param
                host_group["params"].append(inner)
            else:
                device_group["params"].append(inner)
        for g, out in ((device_group, device_groups), (host_group, host_groups)):
            if g["params"]:
                out.append(g)
    return host_groups, device_groups, to_host, to_device, to_fp32


class CpuBackend(Backend):
    name = "cpu"
    dist_backend = "gloo"

    @classmethod
    def available(cls) -> bool:
        return True

    def register_patches(self) -> None:
        r = self.registry
        r.register("torch.cuda.current_device", _current_device,
                   reason="megatron allocates on torch.cuda.current_device(); answer the CPU")
        r.register("torch.cuda.synchronize", _synchronize,
                   reason="p2p/parallel_state synchronize the CUDA stream; nothing to wait for")
        r.register("megatron.core.tensor_parallel.random._get_cuda_rng_state", _get_rng_state,
                   reason="RNG tracker fork/recompute: use the CPU generator")
        r.register("megatron.core.tensor_parallel.random._set_cuda_rng_state", _set_rng_state,
                   reason="RNG tracker fork/recompute: use the CPU generator")
        r.register("megatron.core.tensor_parallel.random.CudaRNGStatesTracker.add", _tracker_add,
                   reason="tracker.add seeds torch.cuda; seed a CPU generator state instead")
        r.register("megatron.core.pipeline_parallel.p2p_communication._batched_p2p_ops",
                   _tagged_batched_p2p, reason="gloo matches untagged p2p by order: tag directions")
        r.register("megatron.core.pipeline_parallel.p2p_communication._p2p_ops", _tagged_p2p,
                   reason="gloo matches untagged p2p by order: tag directions")
        # megatron-core decorates its fused kernels (bias+GeLU/SwiGLU, bias-dropout-add,
        # ...) with jit_fuser = torch.compile at import, which imports torch._dynamo and
        # torch._inductor: 1.3-1.5 s CPU of every process's start-up, for kernels the Llama
        # config never calls (every *_fusion flag is off). Eager functions compute the same.
        r.register("megatron.core.jit.jit_fuser", _no_jit_fuser,
                   reason="torch.compile decorators cost start-up and are unused on CPU")
        # optimizer CPU offload (OPTIMIZER_OFFLOAD=static|auto)
        offload_fixes.register(r, inner=on_cpu)  # also a CUDA-literal function
        r.register(f"{_HYBRID}._get_sub_optimizer_param_groups", _split_params_host_is_device,
                   reason="offloads only is_cuda params, then KeyErrors on host ones")
        for method in ("_init_sub_optimizers", "step"):
            r.register(f"{_HYBRID}.{method}", wrapper=on_host_streams,
                       reason="overlaps copies on torch.cuda streams; pins host buffers")
        for target in _CUDA_LITERAL_FUNCTIONS:
            if target == offload_fixes.TARGET:
                continue
            r.register(target, wrapper=on_cpu,
                       reason="allocates with device='cuda' or checks CUDA type names")
