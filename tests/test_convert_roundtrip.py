"""HF -> megatron-core -> HF through the streaming converter and real files is bit-exact
for every generation at every TP x PP that divides the model; the megatron files hold
exactly what the mapping table prescribes."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from megatron_patch import checkpoint as ck
from megatron_patch.checkpoint.load import FileSource
from megatron_patch.models.llama import mapping
from megatron_patch.conversion.hf2mcore import FileSink, hf_to_mcore, validate_hf
from megatron_patch.conversion.hf_files import HFCheckpoint, SafetensorsStreamWriter
from megatron_patch.conversion.mcore2hf import mcore_to_hf
from megatron_patch.conversion.synthetic import small_arch, write_hf_checkpoint

GENERATIONS = ("llama", "llama2", "llama3", "llama3_1")
CASES = [(g, tp, pp) for g in GENERATIONS for tp in (1, 2, 4) for pp in (1, 2, 4)
         if small_arch(g).num_key_value_heads % tp == 0]


# the converter's CHECK opens a 1-process group in this process (conftest.py)
pytestmark = pytest.mark.usefixtures("process_group_closed_after_module")


def hf_to_files(hf_dir, out, arch, tp, pp, dtype, pp0=None):
    staging = ck.begin_save(out, "release")
    args = ck.make_args(arch, tp, pp, "fp32", pp0_layers=pp0)
    hf_to_mcore(HFCheckpoint(hf_dir), arch, tp, pp, dtype, FileSink(staging, pp, args), pp0,
                progress=False)
    ck.commit_save(out, "release")


def files_to_hf(ckpt_root, out, arch, dtype, shard_bytes=40_000):
    source = FileSource(ck.find_checkpoint(ckpt_root))
    try:
        w = SafetensorsStreamWriter(out, mapping.hf_tensor_plan(arch), dtype, shard_bytes)
        mcore_to_hf(source, arch, w, progress=False)
        files = w.close()
    finally:
        source.close()
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert sorted(set(index["weight_map"].values())) == sorted(files)
    back = {}
    for fname in files:
        back.update(load_file(os.path.join(out, fname)))
    return back


def assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        if a[k] is None or b[k] is None:  # _extra_state entries
            assert a[k] is None and b[k] is None, k
            continue
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("gen,tp,pp", CASES)
def test_round_trip_bit_exact(tmp_path, gen, tp, pp):
    arch = small_arch(gen)
    hf_dir, mc = str(tmp_path / "hf"), str(tmp_path / "mc")
    sd = write_hf_checkpoint(hf_dir, arch, shard_bytes=60_000)
    hf_to_files(hf_dir, mc, arch, tp, pp, torch.float32)
    ckpt = ck.find_checkpoint(mc)
    assert (ckpt.iteration, ckpt.tp, ckpt.pp) == ("release", tp, pp)
    # each rank file holds exactly the mapping table's tensors (stage-local layer names)
    for p in range(pp):
        layers = mapping.stage_layers(arch.num_layers, pp, p)
        for t in range(tp):
            obj = ck.load_rank_file(ckpt.file(t, p))
            assert obj["checkpoint_version"] == 3.0 and obj["iteration"] == 0
            assert obj["args"].tensor_model_parallel_size == tp
            want = mapping.hf_to_mcore_state(sd, arch, tp, t, layers, p == 0, p == pp - 1)
            tensors = {k: v for k, v in obj["model"].items() if v is not None}
            assert_same(tensors, want)
            # megatron-core's _extra_state entries (None), so a strict load_state_dict works
            extra = sorted(k for k, v in obj["model"].items() if v is None)
            assert len(extra) == 4 * len(layers) + (p == pp - 1)
            assert all(k.endswith("._extra_state") for k in extra)
    assert_same(files_to_hf(mc, str(tmp_path / "back"), arch, torch.float32), sd)


@pytest.mark.parametrize("tp,pp", [(2, 2), (4, 1), (1, 4)])
def test_tied_embeddings_and_padded_vocab(tmp_path, tp, pp):
    arch = small_arch("llama2", tie_word_embeddings=True, vocab_size=1000)
    hf_dir, mc = str(tmp_path / "hf"), str(tmp_path / "mc")
    sd = write_hf_checkpoint(hf_dir, arch)
    assert "lm_head.weight" not in sd
    hf_to_files(hf_dir, mc, arch, tp, pp, torch.float32)
    ckpt = ck.find_checkpoint(mc)
    padded = arch.padded_vocab_size(tp)
    emb = [ck.load_rank_file(ckpt.file(t, 0))["model"]["embedding.word_embeddings.weight"]
           for t in range(tp)]
    full = torch.cat(emb)
    assert full.shape[0] == padded == 1024 and torch.count_nonzero(full[1000:]) == 0
    last = [ck.load_rank_file(ckpt.file(t, pp - 1))["model"] for t in range(tp)]
    if pp > 1:  # megatron-core's last stage keeps its own copy of the tied embedding
        assert all(torch.equal(m["output_layer.weight"], e) for m, e in zip(last, emb))
    else:
        assert "output_layer.weight" not in last[0]
    assert_same(files_to_hf(mc, str(tmp_path / "back"), arch, torch.float32), sd)


def test_bf16_round_trip_and_fp32_to_bf16(tmp_path):
    arch = small_arch("llama3_1")
    sd = write_hf_checkpoint(str(tmp_path / "hf"), arch, dtype=torch.bfloat16)
    hf_to_files(str(tmp_path / "hf"), str(tmp_path / "mc"), arch, 2, 2, torch.bfloat16)
    assert_same(files_to_hf(str(tmp_path / "mc"), str(tmp_path / "back"), arch,
                            torch.bfloat16), sd)
    # PR decides the written dtype: fp32 source -> bf16 files equal the rounded source
    sd32 = write_hf_checkpoint(str(tmp_path / "hf32"), arch, seed=3)
    hf_to_files(str(tmp_path / "hf32"), str(tmp_path / "mc16"), arch, 1, 2, torch.bfloat16)
    back = files_to_hf(str(tmp_path / "mc16"), str(tmp_path / "back16"), arch, torch.bfloat16)
    assert_same(back, {k: v.bfloat16() for k, v in sd32.items()})


def test_uneven_first_stage(tmp_path):
    arch = small_arch("llama3", num_layers=5)
    sd = write_hf_checkpoint(str(tmp_path / "hf"), arch)
    hf_to_files(str(tmp_path / "hf"), str(tmp_path / "mc"), arch, 2, 3, torch.float32, pp0=1)
    ckpt = ck.find_checkpoint(str(tmp_path / "mc"))
    first = ck.load_rank_file(ckpt.file(0, 0))["model"]
    assert {k.split(".")[2] for k in first if k.startswith("decoder.layers.")} == {"0"}
    assert_same(files_to_hf(str(tmp_path / "mc"), str(tmp_path / "back"), arch,
                            torch.float32), sd)


def test_pytorch_bin_source_and_validation(tmp_path):
    arch = small_arch("llama")
    sd = write_hf_checkpoint(str(tmp_path / "st"), arch)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    torch.save(sd, bin_dir / "pytorch_model.bin")
    hf = HFCheckpoint(str(bin_dir))
    assert hf.format == "bin"
    validate_hf(hf, arch)
    hf_to_files(str(bin_dir), str(tmp_path / "mc"), arch, 2, 2, torch.float32)
    assert_same(files_to_hf(str(tmp_path / "mc"), str(tmp_path / "back"), arch,
                            torch.float32), sd)
    other = small_arch("llama", hidden_size=32)
    with pytest.raises(ValueError, match="has shape"):
        validate_hf(hf, other)


@pytest.mark.parametrize("tp,pp", [(1, 1), (4, 2)])
def test_byte_copy_equals_tensor_path(tmp_path, monkeypatch, tp, pp):
    """The kernel-copy path (rowcopy) writes exactly what the tensor path computes, and is
    the path taken when dtypes match (every tensor, also row-parallel column blocks)."""
    from megatron_patch.checkpoint import fileio
    arch = small_arch("llama2", tie_word_embeddings=True)
    sd = write_hf_checkpoint(str(tmp_path / "hf"), arch, dtype=torch.bfloat16, seed=5)
    calls = []
    real_copy = fileio.copy_range
    monkeypatch.setattr(fileio, "copy_range", lambda *a: calls.append(a) or real_copy(*a))
    outs = {}
    for fast in (True, False):
        mc = str(tmp_path / f"mc{fast}")
        staging = ck.begin_save(mc, "release")
        hf = HFCheckpoint(str(tmp_path / "hf"))
        hf_to_mcore(hf, arch, tp, pp, torch.bfloat16,
                    FileSink(staging, pp, ck.make_args(arch, tp, pp, "bf16")), progress=False,
                    byte_copy=fast)
        hf.close()
        ck.commit_save(mc, "release")
        ckpt = ck.find_checkpoint(mc)
        outs[fast] = {k: ck.load_rank_file(f)["model"] for k, f in ckpt.files.items()}
        n_forward = len(calls)
        source = FileSource(ckpt)
        w = SafetensorsStreamWriter(str(tmp_path / f"back{fast}"), mapping.hf_tensor_plan(arch),
                                    torch.bfloat16, 10**9)
        mcore_to_hf(source, arch, w, progress=False, byte_copy=fast)
        source.close()
        w.close()
        back = load_file(str(tmp_path / f"back{fast}" / "model-00001-of-00001.safetensors"))
        assert_same(back, sd)
        if fast:
            assert n_forward > 0 and len(calls) > n_forward
        else:
            assert len(calls) == 0
        calls.clear()
    for key in outs[True]:
        assert_same(outs[True][key], outs[False][key])


def test_virtual_pipeline_layout_written(tmp_path, capsys, monkeypatch):
    """MP_VP=2 at PP=2: each rank file holds model0/model1, chunk v of PP rank p holding layers
    (v*PP + p)*2 .. +1 of 8 (megatron-core's interleaved placement, worked out by hand), each
    chunk exactly the mapping table's tensors; CHECK reads the layout and the way back is
    bit-exact."""
    from megatron_patch.conversion import cli
    arch = small_arch("llama3", num_layers=8)
    sd = write_hf_checkpoint(str(tmp_path / "hf"), arch, seed=9)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setenv("MP_VP", "2")
    mc = str(tmp_path / "mc")
    assert cli.main(["auto", str(tmp_path / "hf"), mc, "2", "2", "false", "true", "false",
                     "fp32"]) == 0
    assert "CHECK PASSED" in capsys.readouterr().out
    ckpt = ck.find_checkpoint(mc)
    placement = {(0, 0): [0, 1], (1, 0): [2, 3], (0, 1): [4, 5], (1, 1): [6, 7]}  # (p, v)
    for (p, v), layers in placement.items():
        for t in range(2):
            obj = ck.load_rank_file(ckpt.file(t, p))
            assert "model" not in obj and obj["args"].virtual_pipeline_model_parallel_size == 2
            got = {k: x for k, x in obj[f"model{v}"].items() if x is not None}
            assert_same(got, mapping.hf_to_mcore_state(sd, arch, 2, t, layers,
                                                       (p, v) == (0, 0), (p, v) == (1, 1)))
    monkeypatch.delenv("MP_VP")
    assert cli.main(["auto", mc, str(tmp_path / "back"), "1", "1", "true", "false", "false",
                     "fp32"]) == 0
    from megatron_patch.conversion.hf_files import HFCheckpoint as _HF
    back = _HF(str(tmp_path / "back"))
    assert_same(dict(zip(sd, back.read(list(sd)))), sd)
    for vp, pp, needle in (("3", "2", "PP=2 x MP_VP=3 must divide the model's 8 layers"),
                           ("2", "1", "virtual pipeline stages need PP > 1")):
        monkeypatch.setenv("MP_VP", vp)
        capsys.readouterr()
        assert cli.main(["auto", str(tmp_path / "hf"), str(tmp_path / "x"), "1", pp, "false",
                         "false", "false", "fp32"]) == 2
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
