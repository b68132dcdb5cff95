"""The streamed CHECK (one layer per side in memory) against the whole-model check: the same
numbers on every point, for every generation and TP/PP in {1, 2}; sampled layers checked in
isolation; peak memory that does not grow with the number of layers."""
import os
import subprocess
import sys

import pytest
import torch

from megatron_patch import checkpoint as ck
from megatron_patch.checkpoint.load import FileSource, reshard_state
from megatron_patch.conversion import check, cli
from megatron_patch.conversion.hf_files import HFCheckpoint
from megatron_patch.conversion.stream_check import stream_parity
from megatron_patch.conversion.synthetic import small_arch, write_hf_checkpoint
from megatron_patch.conversion.weights import SourceWeights

from test_convert_roundtrip import hf_to_files

GENERATIONS = ("llama", "llama2", "llama3", "llama3_1")


# the converter's CHECK opens a 1-process group in this process (conftest.py)
pytestmark = pytest.mark.usefixtures("process_group_closed_after_module")


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.delenv("MP_CHECK_LAYERS", raising=False)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    out = {}
    for gen in GENERATIONS:
        arch = small_arch(gen)
        write_hf_checkpoint(str(root / gen), arch, dtype=torch.float32, seed=11)
        out[gen] = (str(root / gen), arch)
    return out


def _perturb_rank_files(ckpt, seed):
    """Noise on every tensor of every rank file: HF and megatron then differ at every point
    by amounts that depend on everything upstream (identical zeros would prove nothing)."""
    g = torch.Generator().manual_seed(seed)
    for path in ckpt.files.values():
        obj = ck.load_rank_file(path, mmap=False)  # rewritten below
        for name, t in obj["model"].items():
            if t is not None:
                obj["model"][name] = t + 3e-3 * t.abs().mean() * torch.randn(
                    t.shape, generator=g).to(t.dtype)
        torch.save(obj, path)


@pytest.mark.parametrize("gen", GENERATIONS)
@pytest.mark.parametrize("tp,pp", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_stream_equals_whole_model_numbers(tmp_path, hf_dirs, gen, tp, pp):
    hf_dir, arch = hf_dirs[gen]
    precision = "bf16" if (tp + pp) % 2 else "fp32"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    hf_to_files(hf_dir, str(tmp_path / "mc"), arch, tp, pp, dtype)
    ckpt = ck.find_checkpoint(str(tmp_path / "mc"))
    _perturb_rank_files(ckpt, seed=tp * 10 + pp)
    source, hf = FileSource(ckpt), HFCheckpoint(hf_dir)
    try:
        streamed = stream_parity(hf, SourceWeights(source, arch), arch, precision)
        whole = check.parity(check.hf_from_dir(hf_dir, precision),
                             check.build_mcore(arch, reshard_state(source, arch, 1, 1, 0, 0)[0],
                                               precision), arch, precision)
    finally:
        source.close()
        hf.close()
    assert [(r.point, r.positions) for r in streamed.rows] == \
        [(r.point, r.positions) for r in whole.rows]
    assert len(streamed.rows) == (arch.num_layers + 3) * (2 if gen == "llama3_1" else 1)
    for s, w in zip(streamed.rows, whole.rows):
        assert w.rel > 0, w  # the noise shows at every point
        # float64 sums of the same values in another grouping (logits by vocabulary block)
        assert s.max_abs == pytest.approx(w.max_abs, rel=1e-12, abs=1e-15), s.point
        assert s.rel == pytest.approx(w.rel, rel=1e-9), s.point
        assert s.cos == pytest.approx(w.cos, rel=1e-12), s.point
        assert s.ok == w.ok
    assert streamed.table().splitlines()[2:] == whole.table().splitlines()[2:]


def test_sampled_layers_are_checked_in_isolation(tmp_path, hf_dirs, capsys, monkeypatch):
    """A fault in layer 2: chained, every later row fails too; sampled, layer 3 runs on the
    same input on both sides and passes, and sampling layer 2 names it."""
    hf_dir, arch = hf_dirs["llama3"]
    mc = tmp_path / "mc"
    assert cli.main(["auto", hf_dir, str(mc), "1", "2", "false", "false", "false", "fp32"]) == 0
    path = ck.find_checkpoint(str(mc)).file(0, 1)  # layers 2-3 on the second stage
    obj = ck.load_rank_file(path, mmap=False)
    name = "decoder.layers.0.mlp.linear_fc2.weight"
    obj["model"][name] = obj["model"][name] * 1.05
    torch.save(obj, path)
    argv = ["auto", str(mc), str(tmp_path / "x"), "1", "1", "true", "false", "true", "fp32",
            hf_dir]

    def rows_of(out):
        return {line.split()[2]: line.split()[-1] for line in out.splitlines()
                if line.startswith("decoder layer")}

    assert cli.main(argv) == 1
    out = capsys.readouterr().out
    assert rows_of(out) == {"0": "ok", "1": "ok", "2": "FAIL", "3": "FAIL"}
    monkeypatch.setenv("MP_CHECK_LAYERS", "3,1")
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert rows_of(out) == {"1": "ok", "3": "ok"} and "sampled layers 1,3" in out
    monkeypatch.setenv("MP_CHECK_LAYERS", "2")
    assert cli.main(argv) == 1
    assert "CHECK FAILED: first failing point: decoder layer 2 " in capsys.readouterr().out
    for bad, needle in (("4", "layer 4 does not exist"), ("1,x", "MP_CHECK_LAYERS='1,x'")):
        monkeypatch.setenv("MP_CHECK_LAYERS", bad)
        assert cli.main(argv) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and needle in err[0]


_REPORT_PEAK = ("import sys\n"
                "from megatron_patch.conversion.cli import main\n"
                "rc = main(sys.argv[1:])\n"
                "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n"
                "sys.exit(rc)\n")


def _peak_rss_of_check(hf_dir, tmp_path):
    """Peak RSS (bytes) of a CHECK_ONLY converter process, as the process's own high-water
    mark (a forked child's ru_maxrss would include this big test process)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(TQDM_DISABLE="1", MP_CHECK_LONG="0", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _REPORT_PEAK, "auto", hf_dir,
                        str(tmp_path / "unused"), "1", "1", "false", "false", "true", "fp32"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "CHECK PASSED" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    (line,) = [l for l in r.stdout.splitlines() if l.startswith("VmHWM")]
    return int(line.split()[1]) * 1024


@pytest.mark.slow
def test_check_memory_does_not_grow_with_depth(tmp_path):
    """2 vs 12 layers of 14 MB (fp32) each: holding both models would add 10 x 2 x 14 MB =
    280 MB; the streamed check may add a few layers' worth at most."""
    shallow, deep = (small_arch("llama3", num_layers=n, hidden_size=512, ffn_hidden_size=1792,
                                num_attention_heads=8, num_key_value_heads=4, vocab_size=512)
                     for n in (2, 12))
    layer_bytes = 4 * (512 * (512 + 2 * 256 + 512) + 3 * 512 * 1792)
    rss = {}
    for name, arch in (("shallow", shallow), ("deep", deep)):
        write_hf_checkpoint(str(tmp_path / name), arch, seed=1)
        rss[name] = _peak_rss_of_check(str(tmp_path / name), tmp_path)
    assert rss["deep"] - rss["shallow"] < 4 * layer_bytes, (rss, layer_bytes)
