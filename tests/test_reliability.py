"""Faults a careful user meets, each injected on purpose:

1. a checkpoint holding a pickle whose ``__reduce__`` runs code: refused (unit and through
   the launcher's resume), the payload never runs;
2. a dataset index cache cut by a crash in ``numpy.save``: repaired and rebuilt (without the
   repair megatron-core fails on every restart);
3. a tokenizer file next to the checkpoint cut by a crash: re-copied;
4. a cut latest checkpoint or a tracker holding ``abc``: the newest readable checkpoint is
   used, with one warning line; the launcher refuses a cut PRETRAIN_CHECKPOINT_PATH in one
   line;
5. fp16 at LR 1e6: weights overflow once the loss scale has backed off enough for a step to
   go through (the per-token loss sums gradients: the first steps overflow and are skipped);
   no checkpoint with NaN/Inf weights is committed and training stops with one line.
"""
from __future__ import annotations

import glob
import os

import pytest
import torch

from train_helpers import launcher_env, run_launcher

MARKER_ENV = "MP_TEST_PAYLOAD_MARKER"


class Payload:
    """Unpickling this calls os.system: it creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _malicious_file(path, marker):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"model": {}, "iteration": 1, "optimizer": Payload(marker)}, path)


def test_unsafe_pickle_is_refused(tmp_path):
    from megatron_patch.checkpoint import UnsafeCheckpointError, safe_torch_load
    marker = tmp_path / "pwned"
    f = str(tmp_path / "model_optim_rng.pt")
    _malicious_file(f, marker)
    with pytest.raises(UnsafeCheckpointError, match=r"refused to load.*\(posix\.system\)"):
        safe_torch_load(f)
    assert not marker.exists()
    # the reference: plain torch.load(weights_only=False) would have run it
    torch.load(f, weights_only=False)
    assert marker.exists()


GBS, SEQ = 4, 32


def _args(w, out, prec="fp32", lr="1e-3", iters=3, save=1, ckpt=None):
    return ["dsw", "auto", 1, GBS, lr, "0", SEQ, SEQ, prec, 1, 1, 1, "false", "false",
            "true", "false", "false", "false", save, w.corpus, w.corpus, ckpt or w.release,
            iters * GBS * SEQ, 0, out]


def _one_line(p, words):
    """Non-zero exit, exactly one output line with ``words``, no traceback (the launcher
    prints the trainer's output on stdout, its own errors on stderr)."""
    lines = [line for line in (p.stdout + p.stderr).splitlines() if line.strip()]
    hits = [line for line in lines if all(w in line for w in words)]
    assert p.returncode != 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert len(hits) == 1, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stdout + p.stderr, p.stderr[-3000:]


@pytest.mark.slow
def test_resume_refuses_a_malicious_checkpoint(world, tmp_path):
    from megatron_patch.checkpoint import write_tracker
    from megatron_patch.training.arguments import build_config
    out = str(tmp_path / "out")
    args = _args(world, out)
    cfg = build_config([str(a) for a in args], "llama2", env={})
    marker = tmp_path / "pwned"
    # a real checkpoint (its weights fit the model) with the payload in its optimizer entry
    from megatron_patch.checkpoint import load_rank_file
    state = load_rank_file(os.path.join(world.release, "release", "mp_rank_00",
                                        "model_optim_rng.pt"), mmap=False)
    state.update(iteration=1, optimizer=Payload(marker))
    f = os.path.join(cfg.checkpoint_dir, "iter_0000001", "mp_rank_00", "model_optim_rng.pt")
    os.makedirs(os.path.dirname(f))
    torch.save(state, f)
    write_tracker(cfg.checkpoint_dir, 1)
    p = run_launcher(args, "llama2", env=launcher_env(MP_EVAL_ITERS=0), cwd=str(tmp_path))
    _one_line(p, ["refused to load", "model_optim_rng.pt"])
    assert not marker.exists()


def test_cut_index_cache_is_rebuilt(world, tmp_path, monkeypatch):
    from megatron_patch.data import index_cache
    from megatron_patch.data.pretrain import build_pretrain_datasets
    cache = str(tmp_path / "cache")
    notes = []

    def build():
        return build_pretrain_datasets([world.corpus], None, None, None, SEQ, 1234, (40, 8),
                                       512, 2, "90,10,0", cache_dir=cache, note=notes.append)
    ref, _ = build()
    first = ref[3]["tokens"].clone()
    victim = sorted(glob.glob(os.path.join(cache, "*-train-sample_index.npy")))[0]
    with open(victim, "r+b") as f:  # a crash in the middle of numpy.save
        f.truncate(os.path.getsize(victim) // 2)
    real_repair = index_cache.repair_index_cache
    monkeypatch.setattr(index_cache, "repair_index_cache", lambda d: [])
    with pytest.raises(ValueError, match="mmap length"):  # what users saw on every restart
        build()
    monkeypatch.setattr(index_cache, "repair_index_cache", real_repair)
    again, _ = build()
    assert torch.equal(again[3]["tokens"], first)
    assert any("damaged" in n and "rebuilding" in n for n in notes), notes
    assert index_cache.npy_problem(victim) is None


def test_cut_tokenizer_companion_is_recopied(world, tmp_path):
    from megatron_patch.models.llama import LlamaArch
    from megatron_patch.training.arguments import build_config
    from megatron_patch.training.checkpointing import write_companions
    cfg = build_config([str(a) for a in _args(world, str(tmp_path / "out"))], "llama2",
                       env={})
    run = type("R", (), {"cfg": cfg, "arch": LlamaArch.from_hf_config(world.hf)})()
    os.makedirs(cfg.checkpoint_dir)
    cut = os.path.join(cfg.checkpoint_dir, "tokenizer.model")
    open(cut, "wb").close()  # the 0-byte file a kill during the copy left
    write_companions(run)
    src = os.path.join(world.release, "tokenizer.model")
    assert open(cut, "rb").read() == open(src, "rb").read()
    leftovers = [n for n in os.listdir(cfg.checkpoint_dir) if ".tmp" in n]
    assert not leftovers


def _tiny_ckpt(root, iteration):
    from megatron_patch.checkpoint import begin_save, checkpoint_file, commit_save
    staging = begin_save(root, iteration)
    f = checkpoint_file(staging, 0)
    os.makedirs(os.path.dirname(f))
    torch.save({"model": {"w": torch.ones(64)}, "iteration": iteration}, f)
    commit_save(root, iteration)
    return os.path.join(root, f"iter_{iteration:07d}", "mp_rank_00", "model_optim_rng.pt")


def test_cut_latest_checkpoint_and_bad_tracker_fall_back(tmp_path):
    from megatron_patch.checkpoint import find_checkpoint
    from megatron_patch.training.checkpointing import find_resume
    root = str(tmp_path / "ck")
    _tiny_ckpt(root, 2)
    newest = _tiny_ckpt(root, 4)
    assert find_checkpoint(root).iteration == 4
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) - 100)
    warnings = []
    found = find_resume(root, warn=warnings.append)
    assert found.iteration == 2
    assert len(warnings) == 1 and "iter_0000004" in warnings[0] and "truncated" in \
        warnings[0] and "resuming from" in warnings[0]
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("abc\n")
    warnings.clear()
    assert find_resume(root, warn=warnings.append).iteration == 2
    assert any("'abc'" in w for w in warnings) and len(warnings) == 2
    os.truncate(os.path.join(root, "iter_0000002", "mp_rank_00", "model_optim_rng.pt"), 0)
    warnings.clear()
    assert find_resume(root, warn=warnings.append) is None
    assert len(warnings) == 1 and "no readable checkpoint" in warnings[0]


def test_launcher_refuses_a_cut_pretrained_checkpoint(world, tmp_path):
    import shutil
    ck = str(tmp_path / "ck")
    shutil.copytree(world.release, ck)
    f = os.path.join(ck, "release", "mp_rank_00", "model_optim_rng.pt")
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 3)
    p = run_launcher(_args(world, str(tmp_path / "out"), ckpt=ck), "llama2", cwd=str(tmp_path))
    _one_line(p, ["PRETRAIN_CHECKPOINT_PATH", "truncated"])
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
def test_fp16_overflow_never_commits_nonfinite_weights(world, tmp_path):
    out = str(tmp_path / "out")
    p = run_launcher(_args(world, out, prec="fp16", lr="1e6", iters=24, save=1), "llama2",
                     env=launcher_env(MP_EVAL_ITERS=0), cwd=str(tmp_path))
    _one_line(p, ["stopped", "NaN/Inf"])
    from megatron_patch.checkpoint import find_checkpoint
    for d in glob.glob(os.path.join(out, "checkpoint", "*")):
        try:
            found = find_checkpoint(d)
        except FileNotFoundError:
            continue  # nothing committed at all is fine
        state = torch.load(found.file(0), weights_only=False, map_location="cpu")
        for k, v in state["model"].items():
            if torch.is_tensor(v) and v.is_floating_point():
                assert torch.isfinite(v).all(), (found.path, k)


def test_nan_stop_counts_a_window():
    """NaN/Inf iterations count within a sliding window, not over the whole run."""
    from megatron_patch.training.loop import RecentCount
    w = RecentCount(4)
    assert [w.add(i) for i in (1, 2, 3)] == [1, 2, 3]          # 3 in a row: limit 3 stops
    w = RecentCount(4)
    assert [w.add(i) for i in (1, 5, 9, 13)] == [1, 1, 1, 1]   # spread out: never adds up
    w = RecentCount(4)
    assert [w.add(i) for i in (1, 3, 4, 5, 8)] == [1, 2, 3, 3, 2]  # 1 leaves at 5
