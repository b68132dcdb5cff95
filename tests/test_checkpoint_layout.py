"""The Megatron checkpoint layout (megatron_patch.checkpoint): names, tracker, atomic
commit, latest-complete discovery, the streaming torch writer / lazy reader, and loading a
rank's state from a checkpoint saved in another TP/PP/VP layout."""
import argparse
import os

import numpy as np
import pytest
import torch

from megatron_patch import checkpoint as ck
from megatron_patch.checkpoint.torch_file import Opaque
from megatron_patch.models.llama import mapping
from megatron_patch.conversion.synthetic import random_hf_state, small_arch


def test_names():
    assert ck.iteration_dirname("release") == "release"
    assert ck.iteration_dirname(1500) == "iter_0001500"
    assert ck.rank_dirname(3) == "mp_rank_03"
    assert ck.rank_dirname(1, 2, pp_size=4) == "mp_rank_01_002"
    assert ck.checkpoint_file("/c/iter_0000010", 0, 1, 2) == \
        "/c/iter_0000010/mp_rank_00_001/model_optim_rng.pt"
    with pytest.raises(ValueError):
        ck.iteration_dirname(-1)


def _save(root, iteration, tp, pp, commit=True):
    staging = ck.begin_save(root, iteration)
    for t in range(tp):
        for p in range(pp):
            state = ck.checkpoint_state([{"w": torch.full((2,), float(t * 10 + p))}], iteration)
            ck.save_rank_file(ck.checkpoint_file(staging, t, p, pp), state)
    if commit:
        ck.commit_save(root, iteration)


def test_atomic_save_tracker_last_and_latest_complete(tmp_path):
    root = str(tmp_path)
    assert ck.read_tracker(root) is None
    _save(root, 10, tp=2, pp=2)
    assert ck.read_tracker(root) == 10
    found = ck.find_checkpoint(root)
    assert (found.iteration, found.tp, found.pp) == (10, 2, 2)
    assert os.path.basename(found.file(1, 1)) == "model_optim_rng.pt"
    obj = ck.load_rank_file(found.file(1, 1))
    assert obj["iteration"] == 10 and obj["checkpoint_version"] == 3.0
    assert torch.equal(obj["model"]["w"], torch.full((2,), 11.0))

    # a crash before commit: the staged save is invisible, the tracker unchanged
    _save(root, 20, tp=2, pp=2, commit=False)
    assert ck.read_tracker(root) == 10 and ck.find_checkpoint(root).iteration == 10
    assert not os.path.exists(os.path.join(root, "iter_0000020"))
    # committing a new save replaces the tracker; re-saving an iteration replaces it whole
    _save(root, 20, tp=1, pp=1)
    assert ck.read_tracker(root) == 20 and ck.find_checkpoint(root).tp == 1
    # tracker pointing to an incomplete/missing directory: the newest complete one is used
    ck.write_tracker(root, 30)
    os.makedirs(os.path.join(root, "iter_0000030", "mp_rank_00"))
    assert ck.find_checkpoint(root).iteration == 20
    assert ck.find_checkpoint(root, iteration=10).tp == 2
    assert ck.find_checkpoint(os.path.join(root, "iter_0000010")).iteration == 10
    assert ck.list_iterations(root) == [10, 20, 30]
    with pytest.raises(FileNotFoundError):
        ck.find_checkpoint(str(tmp_path / "nothing"))


def test_streaming_writer_loads_with_torch_load(tmp_path):
    path = str(tmp_path / "f.pt")
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).bfloat16(),
               "c": torch.arange(12, dtype=torch.float16).view(3, 4)[:, 1:],  # a view
               "d": torch.zeros(0, 4)}
    w = ck.StreamingTorchWriter(path)
    model = {k: w.add(v) for k, v in tensors.items()}
    args = argparse.Namespace(tensor_model_parallel_size=2, params_dtype=torch.bfloat16)
    w.close(ck.checkpoint_state([model], "release", args))
    with torch.serialization.safe_globals([argparse.Namespace]):  # plain torch.load works
        obj = torch.load(path, weights_only=True)
    assert obj["iteration"] == 0 and obj["args"].tensor_model_parallel_size == 2
    for k, v in tensors.items():
        assert obj["model"][k].dtype == v.dtype and torch.equal(obj["model"][k], v)
    lazy = ck.LazyTorchFile(path)
    assert all(torch.equal(lazy.obj["model"][k].load(), v) for k, v in tensors.items())


def test_lazy_reader_on_training_style_file(tmp_path):
    """torch.save output with shared-storage views, optimizer and numpy RNG state: model
    tensors read lazily, everything else opaque and never executed."""
    path = str(tmp_path / "t.pt")
    flat = torch.randn(100)
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p])
    p.grad = torch.ones(3)
    opt.step()
    torch.save({"model": {"x": flat[10:40].view(5, 6), "y": flat.view(10, 10).t(),
                          "z": torch.nn.Parameter(torch.ones(2))},
                "optimizer": opt.state_dict(), "rng_state": [{"np": np.random.get_state()}],
                "iteration": 7}, path)
    f = ck.LazyTorchFile(path)
    m = f.obj["model"]
    assert torch.equal(m["x"].load(), flat[10:40].view(5, 6))
    assert torch.equal(m["y"].load(), flat.view(10, 10).t())
    assert torch.equal(m["z"].load(), torch.ones(2))
    assert f.obj["iteration"] == 7
    assert isinstance(f.obj["rng_state"][0]["np"][1], Opaque)


def _save_layout(root, arch, sd, tp, pp, vp=None, local_names=False, extra=None):
    """Save like training would (torch.save of per-rank dicts, VP chunks as model0/1)."""
    staging = ck.begin_save(root, 5)
    for p in range(pp):
        for t in range(tp):
            chunks = []
            for layers, first, last in ck.load.chunk_layout(arch.num_layers, pp, p, vp):
                chunk = mapping.hf_to_mcore_state(sd, arch, tp, t, layers, first, last)
                if arch.tie_word_embeddings and last and not first:
                    full = mapping.pack(ck.load.TIED_OUTPUT_RULE, [sd["model.embed_tokens.weight"]],
                                        arch, arch.padded_vocab_size(tp))
                    chunk["output_layer.weight"] = mapping.shard(ck.load.TIED_OUTPUT_RULE, full, tp, t)
                chunks.append(mapping.to_local_names(chunk) if local_names else chunk)
            state = ck.checkpoint_state(chunks, 5, ck.make_args(arch, tp, pp, "fp32", vp=vp),
                                        **(extra or {}))
            ck.save_rank_file(ck.checkpoint_file(staging, t, p, pp), state)
    ck.commit_save(root, 5)


@pytest.mark.parametrize("saved,wanted", [
    ((2, 2, None), (1, 1, None)), ((1, 1, None), (4, 2, None)), ((2, 2, 2), (2, 1, None)),
    ((1, 2, None), (2, 2, 2)), ((4, 1, None), (2, 2, None))])
@pytest.mark.parametrize("tie", [False, True])
def test_load_model_state_reshards(tmp_path, saved, wanted, tie):
    arch = small_arch("llama3" if saved[0] < 4 and wanted[0] < 4 else "llama2",
                      tie_word_embeddings=tie, num_layers=4)
    sd = random_hf_state(arch)
    _save_layout(str(tmp_path), arch, sd, *saved, local_names=saved[2] is not None,
                 extra={"optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}}})
    tp, pp, vp = wanted
    for p in range(pp):
        for t in range(tp):
            got = ck.load_model_state(str(tmp_path), tp, pp, t, p, vp=vp)
            layout = ck.load.chunk_layout(arch.num_layers, pp, p, vp)
            assert len(got) == len(layout)
            for chunk, (layers, first, last) in zip(got, layout):
                want = mapping.hf_to_mcore_state(sd, arch, tp, t, layers, first, last)
                if tie and last and not first:  # the tied copy, padded for this TP
                    full = mapping.pack(ck.load.TIED_OUTPUT_RULE,
                                        [sd["model.embed_tokens.weight"]], arch,
                                        arch.padded_vocab_size(tp))
                    want["output_layer.weight"] = mapping.shard(ck.load.TIED_OUTPUT_RULE,
                                                                full, tp, t)
                assert sorted(chunk) == sorted(want)
                for k in want:
                    assert torch.equal(chunk[k], want[k]), k


def test_block_plans_copy_or_gather(tmp_path):
    """Few runs: kernel copies; many small pieces (row-parallel column blocks): one read +
    gather. Both give exactly the bytes the tensor operation gives."""
    from megatron_patch.conversion import rowcopy
    src = torch.randn(300, 8)
    path = tmp_path / "src.bin"
    path.write_bytes(b"PAD" + src.numpy().tobytes())
    fd = os.open(path, os.O_RDONLY)
    loc = [rowcopy.Located(fd, 3, torch.float32, (300, 8))]
    fns = {"rows": lambda p: [p[0][10:20], torch.cat([p[0][:5], p[0].new_zeros(2, p[0].shape[1])])],
           "cols": lambda p: list(p[0].chunk(2, dim=1))}
    for kind, fn in fns.items():
        plans = rowcopy.plan_blocks(fn, loc, torch.float32)
        want = fn([src])
        assert [s for s, _ in plans] == [tuple(w.shape) for w in want]
        many = [p.segments() is None for _, p in plans]
        assert many == ([False, False] if kind == "rows" else [True, True])
        for (shape, plan), w in zip(plans, want):
            out = tmp_path / "out.bin"
            dst = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            assert plan.write_to(dst) == w.numel() * 4
            os.close(dst)
            assert torch.equal(torch.frombuffer(bytearray(out.read_bytes()), dtype=torch.float32)
                               .view(shape), w)
    assert rowcopy.plan_blocks(fns["rows"], loc, torch.bfloat16) is None  # dtype change
    os.close(fd)
