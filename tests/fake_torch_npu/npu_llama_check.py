"""Child process of tests/test_backend_npu.py: run a tiny Llama under the npu backend with
the fake torch_npu, then again on the CPU reference path (npu patches removed), with the HF
weights the parent saved. ``python npu_llama_check.py IN.pt OUT.pt``.

Run with tests/fake_torch_npu on PYTHONPATH and MEGATRON_PATCH_BACKEND=auto, so the auto
choice itself must pick npu.
"""
from __future__ import annotations

import sys

import torch


def forward_and_grads(model, ids, labels):
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits = model(ids, pos, None).detach().clone()
    loss = model(ids, pos, None, labels=labels).float().mean()
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()
             if p.grad is not None}
    return logits, loss.detach(), grads


def main(inp: str, out: str) -> None:
    torch.set_num_threads(2)
    import torch_npu
    import megatron_patch
    from megatron_patch import parallel
    from megatron_patch.models.llama import mapping
    from megatron_patch.models.llama import get_preset
    from megatron_patch.models.llama.config import transformer_config
    from megatron_patch.backends.layer_specs import local_block_spec
    from megatron_patch.models.llama.provider import build_llama

    data = torch.load(inp)
    backend = megatron_patch.backend
    parallel.init_distributed()
    parallel.initialize_model_parallel()
    arch = get_preset(data["generation"], "tiny")
    arch.vocab_size = data["vocab_size"]
    sd = mapping.to_local_names(mapping.hf_to_mcore_state(data["hf_state"], arch))
    ids, labels = data["ids"], data["labels"]

    torch_npu.CALLS.clear()
    cfg = transformer_config(arch)
    model = build_llama(arch, cfg).eval()  # spec from backend.block_spec
    model.load_state_dict(sd, strict=False)
    npu_logits, npu_loss, npu_grads = forward_and_grads(model, ids, labels)
    calls = dict(torch_npu.CALLS)
    core_attention = type(model.decoder.layers[0].self_attention.core_attention).__name__

    backend.deactivate()  # remove every npu patch: the CPU reference path from here on
    torch_npu.CALLS.clear()
    ref_cfg = transformer_config(arch)
    ref = build_llama(arch, ref_cfg, spec=local_block_spec(ref_cfg)).eval()
    ref.load_state_dict(sd, strict=False)
    ref_logits, ref_loss, ref_grads = forward_and_grads(ref, ids, labels)

    torch.save(dict(
        backend=backend.name, dist_backend=torch.distributed.get_backend(),
        device1=str(backend.device(1)), fused_gate=cfg.bias_activation_fusion,
        ref_fused_gate=ref_cfg.bias_activation_fusion, core_attention=core_attention,
        calls=calls, calls_after_remove=dict(torch_npu.CALLS),
        npu_logits=npu_logits, npu_loss=npu_loss, npu_grads=npu_grads,
        ref_logits=ref_logits, ref_loss=ref_loss, ref_grads=ref_grads,
    ), out)
    parallel.destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
