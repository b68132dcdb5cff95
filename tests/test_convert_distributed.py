"""A converted checkpoint loads into megatron_patch's model at TP=2 and at PP=2 (two gloo
processes each), from a checkpoint saved in that layout and from one saved in another
(re-sharded on load), and its logits equal transformers' within the fp32 CHECK tolerance."""
import os

import pytest
import torch

from mp_utils import run_distributed

from megatron_patch.conversion import cli
from megatron_patch.conversion.check import TOLERANCES, compare
from megatron_patch.conversion.synthetic import small_arch


def _logits_at_layouts(rank, world, runs, ids):
    """For each (tp, pp, [checkpoints]): logits on the last stage, None elsewhere."""
    return [_logits_at_layout(ckpts, tp, pp, ids) for tp, pp, ckpts in runs]


def _logits_at_layout(ckpts, tp, pp, ids):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_patch import parallel
    from megatron_patch.checkpoint import checkpoint_arch, find_checkpoint, load_model_shards
    from megatron_patch.models.llama.config import ParallelSettings, transformer_config
    from megatron_patch.models.llama.provider import build_llama

    parallel.initialize_model_parallel(tp, pp)
    ids = torch.tensor(ids)
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    results = []
    for ckpt in ckpts:
        arch = checkpoint_arch(find_checkpoint(ckpt))
        cfg = transformer_config(arch, ParallelSettings(tp, pp), "fp32",
                                 perform_initialization=False)
        model = build_llama(arch, cfg).eval()
        load_model_shards(ckpt, model)
        with torch.no_grad():
            if not ps.is_pipeline_first_stage():
                h = torch.empty(ids.shape[1], 1, arch.hidden_size)
                dist.recv(h, src=ps.get_pipeline_model_parallel_prev_rank())
                model.set_input_tensor(h)
            out = model(ids, pos, None)
            if not ps.is_pipeline_last_stage():
                dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
                results.append(None)
                continue
            parts = [torch.empty_like(out) for _ in range(tp)]  # vocab-parallel logits
            dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
            results.append(torch.cat(parts, dim=-1)[..., :arch.vocab_size])
    return results


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A transformers-saved llama3_1-shaped model, converted at 2x1, 1x2 and 1x1."""
    from transformers import LlamaForCausalLM

    from megatron_patch.conversion.check import hf_config
    root = tmp_path_factory.mktemp("dist")
    arch = small_arch("llama3_1")
    torch.manual_seed(1)
    hf = LlamaForCausalLM(hf_config(arch)).eval()
    hf.save_pretrained(str(root / "hf"))
    os.environ["TQDM_DISABLE"] = "1"
    for tp, pp in ((2, 1), (1, 2), (1, 1)):
        rc = cli.main(["auto", str(root / "hf"), str(root / f"mc{tp}{pp}"), str(tp), str(pp),
                       "false", "false", "false", "fp32"])
        assert rc == 0
    ids = torch.randint(0, arch.vocab_size, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
    return root, ids.tolist(), ref


def test_loads_at_tp2_and_pp2_with_hf_logits(converted):
    root, ids, ref = converted
    # each layout from the checkpoint saved in it and from the TP=1 PP=1 one (re-sharded);
    # one pair of processes runs both layouts (process start-up dominates the cost)
    runs = [(2, 1, [str(root / "mc21"), str(root / "mc11")]),
            (1, 2, [str(root / "mc12"), str(root / "mc11")])]
    per_rank = run_distributed(_logits_at_layouts, 2, runs, ids)
    tol = TOLERANCES["fp32"]
    tp2 = [per_rank[r][0] for r in range(2)]  # both TP ranks gather the full logits
    pp2 = per_rank[1][1]                      # PP rank 1 is the last stage
    assert per_rank[0][1] == [None, None]
    for logits in tp2[0] + tp2[1] + pp2:
        max_abs, rel, cos = compare(ref, logits)
        assert rel <= tol.rtol and cos >= tol.min_cos, (max_abs, rel, cos)
    assert all(torch.equal(a, b) for a, b in zip(tp2[0], tp2[1]))
