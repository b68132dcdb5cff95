"""The converter's files against megatron-core layouts built by hand, in both directions.

The round-trip tests (test_convert_roundtrip.py) take their expected tensors from the mapping
table itself, so a mistake made the same way in both directions (k and v swapped inside a
query group, fc2 split on the wrong dim) survives them. Here the expected megatron-core
tensors are built directly from the HF tensors with index arithmetic -- per TP rank, per
query group, per pipeline stage -- written out below from megatron-core's layouts
(``mapping`` is not imported):

- linear_qkv (column-parallel): TP rank t holds query groups [t*G/TP, (t+1)*G/TP); each
  group is its heads/groups query heads, then its key head, then its value head (rows of
  head_dim);
- linear_fc1 (column-parallel, gated): rank t holds its slice of gate's rows, then the same
  slice of up's rows;
- linear_proj and linear_fc2 (row-parallel): rank t holds a slice of the *columns*;
- word embeddings / output layer (vocab-parallel): the vocabulary padded with zero rows to
  a multiple of 128 x TP, rank t holds rows [t*V'/TP, (t+1)*V'/TP);
- norms replicated; the input norm is ``linear_qkv.layer_norm_weight``, the post-attention
  norm ``linear_fc1.layer_norm_weight`` (TE names); layers numbered per stage.

hf -> mcore: the converter (its command, as the shell scripts call it) writes TP=2 x PP=2
files equal to the hand-built tensors, bit for bit. mcore -> hf: a checkpoint written
from the hand-built tensors converts back to the HF tensors exactly.
"""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from megatron_patch import checkpoint as ck
from megatron_patch.conversion import cli
from megatron_patch.conversion.synthetic import small_arch, write_hf_checkpoint

TP, PP = 2, 2
# 8 query heads in 4 groups (2 groups per TP rank, 2 query heads per group), head_dim 8;
# vocab 1000 -> padded to 1024 at TP=2; 4 layers, 2 per stage
ARCH = small_arch("llama3_1", vocab_size=1000, hidden_size=64, ffn_hidden_size=96,
                  num_attention_heads=8, num_key_value_heads=4)
H, D, G, NQ, F, V = 64, 8, 4, 8, 96, 1000


def hand_rank(hf: dict, t: int, p: int) -> dict:
    """Rank (t, p)'s megatron-core tensors, built from HF's by index arithmetic."""
    out = {}
    per_stage = ARCH.num_layers // PP
    heads_per_group = NQ // G
    groups = G // TP
    ffn = F // TP
    cols = NQ * D // TP
    padded = -(-V // (128 * TP)) * 128 * TP
    vrows = padded // TP
    for local in range(per_stage):
        i = p * per_stage + local
        L, M = f"model.layers.{i}.", f"decoder.layers.{local}."
        q, k, v = (hf[L + f"self_attn.{n}_proj.weight"] for n in "qkv")
        blocks = []
        for g in range(t * groups, (t + 1) * groups):
            blocks += [q[g * heads_per_group * D:(g + 1) * heads_per_group * D],
                       k[g * D:(g + 1) * D], v[g * D:(g + 1) * D]]
        out[M + "self_attention.linear_qkv.weight"] = torch.cat(blocks)
        out[M + "self_attention.linear_qkv.layer_norm_weight"] = hf[L + "input_layernorm.weight"]
        out[M + "self_attention.linear_proj.weight"] = \
            hf[L + "self_attn.o_proj.weight"][:, t * cols:(t + 1) * cols]
        out[M + "mlp.linear_fc1.weight"] = torch.cat(
            [hf[L + "mlp.gate_proj.weight"][t * ffn:(t + 1) * ffn],
             hf[L + "mlp.up_proj.weight"][t * ffn:(t + 1) * ffn]])
        out[M + "mlp.linear_fc1.layer_norm_weight"] = hf[L + "post_attention_layernorm.weight"]
        out[M + "mlp.linear_fc2.weight"] = hf[L + "mlp.down_proj.weight"][:, t * ffn:(t + 1) * ffn]

    def vocab(w):
        full = torch.cat([w, torch.zeros(padded - V, H, dtype=w.dtype)])
        return full[t * vrows:(t + 1) * vrows]
    if p == 0:
        out["embedding.word_embeddings.weight"] = vocab(hf["model.embed_tokens.weight"])
    if p == PP - 1:
        out["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
        out["output_layer.weight"] = vocab(hf["lm_head.weight"])
    return out


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    for k in ("MP_OVERWRITE", "MP_PP0_LAYERS", "MP_VP"):
        monkeypatch.delenv(k, raising=False)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hand") / "hf")
    return path, write_hf_checkpoint(path, ARCH, seed=11)


def _convert(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 0, err


def test_layout_assumptions():
    """The shapes the hand construction relies on (guards the constants above)."""
    assert (ARCH.hidden_size, ARCH.head_dim, ARCH.num_key_value_heads,
            ARCH.num_attention_heads, ARCH.ffn_hidden_size, ARCH.vocab_size) == (H, D, G, NQ, F, V)
    assert ARCH.padded_vocab_size(TP) == 1024 and not ARCH.tie_word_embeddings


def test_hf_to_mcore_equals_hand_layout(tmp_path, hf, capsys):
    src, sd = hf
    mc = tmp_path / "mc"
    _convert(["auto", src, mc, TP, PP, "false", "false", "false", "fp32"], capsys)
    ckpt = ck.find_checkpoint(str(mc))
    for p in range(PP):
        for t in range(TP):
            got = {k: v for k, v in ck.load_rank_file(ckpt.file(t, p))["model"].items()
                   if v is not None}
            want = hand_rank(sd, t, p)
            assert sorted(got) == sorted(want), (t, p)
            for name, w in want.items():
                assert got[name].shape == w.shape and torch.equal(got[name], w), (t, p, name)


def test_mcore_to_hf_from_hand_layout(tmp_path, hf, capsys):
    src, sd = hf
    mc, back = str(tmp_path / "mc"), tmp_path / "back"
    staging = ck.begin_save(mc, "release")
    args = ck.make_args(ARCH, TP, PP, "fp32")
    for p in range(PP):
        for t in range(TP):
            state = ck.checkpoint_state([{k: v.contiguous() for k, v in
                                          hand_rank(sd, t, p).items()}], "release", args)
            ck.save_rank_file(ck.checkpoint_file(staging, t, p, PP), state)
    ck.commit_save(mc, "release")
    with open(os.path.join(src, "config.json")) as f_in, \
            open(os.path.join(mc, "config.json"), "w") as f_out:
        f_out.write(f_in.read())
    _convert(["auto", mc, back, 1, 1, "true", "false", "false", "fp32", src], capsys)
    got = {}
    for name in os.listdir(back):
        if name.endswith(".safetensors"):
            got.update(load_file(str(back / name)))
    assert sorted(got) == sorted(sd)
    for name, w in sd.items():
        assert torch.equal(got[name], w), name
