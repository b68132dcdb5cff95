"""The cuda backend's training configuration, checked on a CPU: for a Llama-3-8B-shaped model,
with and without Transformer Engine / apex importable (CUDA never touched). apex is mocked at
its import (a ``fused_weight_gradient_mlp_cuda`` module); TE through the backend's probe
``te_available`` plus what importing TE gives megatron-core (its fused rope kernel), since
megatron's TE extension cannot import without the real package. Checked:
no fused kernel is requested whose package is missing, SDPA core attention is chosen
without TE, and PR=fp8 picks TE, else torchao on an fp8-capable GPU, else one clear error.

The table of which switch needs which package is written here from megatron-core 0.16.1's
code, independently of backends/cuda.py."""
from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest
import torch

from megatron_patch.backends import cuda, layer_specs
from megatron_patch.models.llama import get_preset
from megatron_patch.models.llama.config import ParallelSettings, transformer_config
from megatron_patch.transformer import fp8
from megatron_patch.transformer.sdpa_attention import SDPAttention

# TransformerConfig switch -> the package whose kernel it calls (megatron-core 0.16.1)
NEEDS = {
    "masked_softmax_fusion": "apex",          # scaled_masked_softmax_cuda (local attention)
    "persist_layer_norm": "apex",             # apex.contrib.layer_norm
    "gradient_accumulation_fusion": "apex",   # fused_weight_gradient_mlp_cuda (parallel linears)
    "apply_rope_fusion": "te",                # TE's fused_apply_rotary_pos_emb
    "cross_entropy_loss_fusion": "te",        # conservative: TE's or a torch-compiled kernel
    "bias_activation_fusion": "jit",          # torch.jit fusions: not asked for (no biases)
    "bias_dropout_fusion": "jit",
}
ENVS = [frozenset(), frozenset({"te"}), frozenset({"apex"}), frozenset({"te", "apex"})]


@pytest.fixture()
def packages(monkeypatch):
    """packages(set): make Transformer Engine and/or apex's kernels look importable."""
    def install(present):
        monkeypatch.setattr(cuda, "te_available", lambda: "te" in present)
        if "te" in present:  # what importing TE gives megatron-core: the fused rope kernel
            from megatron.core.models.common.embeddings import rope_utils
            monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", lambda *a, **k: None)
            monkeypatch.setattr(layer_specs, "te_block_spec", lambda config, vp=None: "TE spec")
        name = "fused_weight_gradient_mlp_cuda"
        if "apex" in present:
            mod = types.ModuleType(name)
            mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
            monkeypatch.setitem(sys.modules, name, mod)
        else:
            monkeypatch.delitem(sys.modules, name, raising=False)
        return present
    return install


def _llama3_8b_config(overrides):
    return transformer_config(get_preset("llama3", "8B"), ParallelSettings(), "bf16",
                              init_method_std=0.008, **overrides)


@pytest.mark.parametrize("flash_attn", [True, False])
@pytest.mark.parametrize("present", ENVS, ids=lambda p: "+".join(sorted(p)) or "bare")
def test_no_fused_kernel_without_its_package(mp1, packages, present, flash_attn):
    from megatron.core.transformer.enums import AttnBackend
    packages(present)
    backend = cuda.CudaBackend()
    config = _llama3_8b_config(backend.training_overrides(flash_attn, "bf16"))
    asked = {k for k in NEEDS if getattr(config, k)}
    assert all(NEEDS[k] in present for k in asked), (present, asked)
    # each kernel whose package is there is used
    assert config.gradient_accumulation_fusion == ("apex" in present)
    assert config.apply_rope_fusion == ("te" in present)
    assert not config.use_cpu_initialization  # 8B-class weights are initialised on the GPU
    spec = backend.block_spec(config)
    if "te" in present:
        assert spec == "TE spec"
        assert config.attention_backend == (AttnBackend.flash if flash_attn else AttnBackend.fused)
    else:
        assert config.attention_backend == AttnBackend.auto
        attn = spec.layer_specs[0].submodules.self_attention.submodules.core_attention
        assert attn is SDPAttention
        assert len(spec.layer_specs) == 32


def test_optimizer_config_asks_for_nothing_te_only(packages, monkeypatch):
    from megatron_patch.training import model_setup
    packages(set())
    config = _llama3_8b_config(cuda.CudaBackend().training_overrides(True, "bf16"))
    seen = {}
    monkeypatch.setattr(model_setup, "get_megatron_optimizer",
                        lambda opt_config, chunks: seen.setdefault("config", opt_config))
    model_setup.build_optimizer([], config, lr=1e-4, use_distributed_optimizer=True)
    oc = seen["config"]
    assert oc.bf16 and oc.params_dtype == torch.bfloat16 and oc.use_distributed_optimizer
    assert not oc.use_precision_aware_optimizer and not oc.optimizer_cpu_offload


def test_local_8b_layer_builds_and_runs_without_te_or_apex(mp1, packages):
    """One decoder layer at Llama-3-8B's shapes from the cuda backend's spec and config,
    built and run forward on the CPU: nothing in it comes from apex or TE."""
    from megatron.core.transformer.spec_utils import build_module
    packages(set())
    overrides = cuda.CudaBackend().training_overrides(True, "bf16")
    overrides.update(use_cpu_initialization=True, perform_initialization=False)
    config = _llama3_8b_config(overrides)
    spec = cuda.CudaBackend().block_spec(config)
    layer = build_module(spec.layer_specs[0], config=config, layer_number=1)
    # megatron's apex/TE wrappers live in megatron.core.fusions / .extensions
    fused = [f"{type(m).__module__}.{type(m).__name__}" for m in layer.modules()
             if type(m).__module__.startswith(("megatron.core.fusions", "megatron.core.extensions",
                                               "apex", "transformer_engine"))]
    assert not fused, fused
    assert isinstance(layer.self_attention.core_attention, SDPAttention)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.02)
        x = torch.randn(8, 1, 4096, dtype=torch.bfloat16)
        out, _ = layer(x, attention_mask=None)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_fp8_path_choice(packages, monkeypatch):
    backend = cuda.CudaBackend()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "GPU")
    packages({"te", "apex"})
    path = backend.fp8_path()
    assert isinstance(path, fp8.TransformerEngineFp8)
    config = _llama3_8b_config(backend.training_overrides(True, "fp8"))
    assert (config.fp8, config.fp8_recipe, config.fp8_amax_history_len,
            config.fp8_amax_compute_algo) == ("hybrid", "delayed", 1024, "max")

    packages({"apex"})  # no TE: torchao on Hopper, fused wgrad accumulation off
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    path = backend.fp8_path()
    assert isinstance(path, fp8.TorchaoFp8) and not path.emulate
    config = _llama3_8b_config(backend.training_overrides(True, "fp8"))
    assert config.fp8 is None  # megatron's own fp8 switch would be a no-op without TE
    assert not config.gradient_accumulation_fusion

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    with pytest.raises(fp8.Fp8Unavailable, match="compute capability >= 8.9.*8.0"):
        backend.fp8_path()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(fp8, "torchao_missing", lambda: "torchao is not installed")
    with pytest.raises(fp8.Fp8Unavailable, match="Transformer Engine.*torchao is not installed"):
        backend.fp8_path()
