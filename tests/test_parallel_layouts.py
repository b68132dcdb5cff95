"""Parallel layouts at launcher level, several dimensions at once: every layout trains the
same 8-layer model (fp32, 4 iterations, GBS 4) through the real 25-argument command and
must give the TP=1/PP=1/DP=1 run's loss at every iteration (1e-5 relative) and its weights
after the last step (checkpoints merged to TP=1/PP=1 by the converter's reader).

Also:
- re-sharding resume: MP_RESUME_FROM the iteration-2 checkpoint of a TP2xPP2 run (plain
  optimizer) at DP2 with the distributed optimizer, and of a TP2xPP2xDP2 run (distributed
  optimizer) at TP1xPP4 (plain): iterations 3-4 and the final weights equal the
  uninterrupted TP=1 run; without the re-sharded Adam state iteration 4 is 1e-3 off;
- ENV=dlc: two launcher invocations on this machine are node 0 and node 1 of one TP2xPP2
  job (MASTER_ADDR/MASTER_PORT/WORLD_SIZE/RANK, processes per node from MP_NPROC on one
  node and PAI-DLC's KUBERNETES_CONTAINER_RESOURCE_GPU on the other) and give the same
  losses; a node that cannot reach the master stops with one line within MP_RDZV_TIMEOUT.
"""
from __future__ import annotations

import os
import time

import pytest

import layout_helpers as H

pytestmark = pytest.mark.slow  # multi-process / end-to-end

ITERS = 4
REL = 1e-5     # losses and gradient norms: relative, every iteration (seen: <= 3e-7)
# weights after the last step: per tensor, |update - TP1's update| / |TP1's update|, where
# update = final - initial weights. Seen <= 4e-5 (reduction order in fp32, amplified by
# Adam on near-zero gradients); a resume without the re-sharded Adam state gives 0.37.
W_REL = 1e-3

# name: (launcher arguments, processes, env knobs, what the start-up line must say)
LAYOUTS = {
    "tp2_pp2": (dict(tp=2, pp=2, save=2), 4, {}, "TP=2 PP=2 CP=1 DP=1"),
    "dp2_pp2": (dict(pp=2), 4, {}, "TP=1 PP=2 CP=1 DP=2"),
    "tp2_dp2_do": (dict(tp=2, do=True), 4, {}, "TP=2 PP=1 CP=1 DP=2"),
    "pp2_vp2_dp2": (dict(pp=2), 4, {"MP_VP": 2}, "TP=1 PP=2 CP=1 DP=2 VP=2"),
    "tp2_pp2_sp": (dict(tp=2, pp=2, sp=True), 4, {}, "TP=2 PP=2 CP=1 DP=1"),
    "pp4_uneven": (dict(pp=4), 4, {"MP_PP0_LAYERS": 5}, "TP=1 PP=4 CP=1 DP=1"),
    "tp4": (dict(tp=4), 4, {}, "TP=4 PP=1 CP=1 DP=1"),
    "tp2_pp2_dp2_do": (dict(tp=2, pp=2, do=True, save=2), 8, {}, "TP=2 PP=2 CP=1 DP=2"),
}
# name: (saved by, launcher arguments, processes, what the start-up line must say)
RESUMES = {
    "dp2_do_from_tp2_pp2": ("tp2_pp2", dict(do=True), 2, "TP=1 PP=1 CP=1 DP=2"),
    "tp1_pp4_from_tp2_pp2_dp2_do": ("tp2_pp2_dp2_do", dict(pp=4), 4, "TP=1 PP=4 CP=1 DP=1"),
}


class Runs:
    """Each launcher run once per module, on demand (so -k picks run only what they need)."""

    def __init__(self, lw, base):
        self.lw, self.base, self.done = lw, base, {}

    def get(self, name: str) -> dict:
        if name not in self.done:
            self.done[name] = self._run(name)
        return self.done[name]

    def _launch(self, name, kw, nproc, knobs):
        out = os.path.join(self.base, name)
        os.makedirs(out, exist_ok=True)
        rc, text, sec = H.run(H.args(self.lw, out, iters=ITERS, **kw), H.env(nproc, **knobs),
                              os.path.join(out, "launcher.out"), out)
        print(f"{name}: {nproc} processes, {sec:.1f} s")
        return {"rc": rc, "text": text, "losses": H.losses(text), "out": out}

    def _run(self, name):
        if name == "tp1":
            return self._launch(name, {}, 1, {})
        if name in LAYOUTS:
            kw, nproc, knobs, _ = LAYOUTS[name]
            return self._launch(name, kw, nproc, knobs)
        saved_by, kw, nproc, _ = RESUMES[name]
        src = self.get(saved_by)
        assert src["rc"] == 0, src["text"][-3000:]
        it2 = os.path.join(H.checkpoint_dir(src["out"]), "iter_0000002")
        return self._launch(name, kw, nproc, {"MP_RESUME_FROM": it2})


@pytest.fixture(scope="module")
def lw(tmp_path_factory):
    return H.make_layout_world(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def runs(lw, tmp_path_factory):
    return Runs(lw, str(tmp_path_factory.mktemp("layouts")))


@pytest.fixture(scope="module")
def reference(runs, lw):
    r = runs.get("tp1")
    assert r["rc"] == 0, r["text"][-3000:]
    assert sorted(r["losses"]) == list(range(1, ITERS + 1)), r["text"][-3000:]
    r["grad_norms"] = H.grad_norms(r["out"])
    r["initial"] = H.full_weights(lw.release, lw.arch())
    r["weights"] = H.full_weights(H.checkpoint_dir(r["out"]), lw.arch())
    return r


def _assert_close(got: dict, ref: dict, iterations, what):
    assert sorted(got) == list(iterations), (what, got)
    for i in iterations:
        assert abs(got[i] - ref[i]) <= REL * abs(ref[i]), (what, i, got, ref)


def _assert_run_matches(out, text, lw, reference, what, iterations=range(1, ITERS + 1)):
    """Losses (the log) and gradient norms (TensorBoard) at every iteration, then the
    weights after the last one."""
    _assert_close(H.losses(text), reference["losses"], iterations, what + " loss")
    _assert_close(H.grad_norms(out), reference["grad_norms"], iterations, what + " grad norm")
    got = H.full_weights(H.checkpoint_dir(out), lw.arch())
    ref, init = reference["weights"], reference["initial"]
    assert sorted(got) == sorted(ref), what
    for k in ref:
        update = (ref[k] - init[k]).norm()
        assert update > 0, k
        err = float((got[k] - ref[k]).norm() / update)
        assert err <= W_REL, f"{what}: {k} differs from TP=1 by {err:.2e} of its update"


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_equals_tp1(runs, reference, lw, name):
    r = runs.get(name)
    assert r["rc"] == 0, r["text"][-3000:]
    # the layout really is the one asked for (no silent fallback to fewer processes)
    assert LAYOUTS[name][3] + ")" in r["text"], r["text"][:3000]
    if LAYOUTS[name][0].get("do"):
        assert "distributed optimizer" in r["text"]
    kw = LAYOUTS[name][0]
    ck = H.checkpoint_dir(r["out"])
    ranks = os.listdir(os.path.join(ck, f"iter_{ITERS:07d}"))
    assert len([d for d in ranks if d.startswith("mp_rank_")]) == kw.get("tp", 1) * kw.get("pp", 1)
    _assert_run_matches(r["out"], r["text"], lw, reference, name)


@pytest.mark.parametrize("name", list(RESUMES))
def test_resume_in_another_layout_equals_uninterrupted_tp1(runs, reference, lw, name):
    r = runs.get(name)
    assert r["rc"] == 0, r["text"][-3000:]
    assert "resuming from" in r["text"] and "iter_0000002 (iteration 2)" in r["text"]
    assert RESUMES[name][3] + ")" in r["text"], r["text"][:3000]
    _assert_run_matches(r["out"], r["text"], lw, reference, name, range(3, ITERS + 1))


def _dlc_env(rank, port, **extra):
    return H.launcher_env(MP_EVAL_ITERS=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                          WORLD_SIZE=2, RANK=rank, **extra)


def test_dlc_two_nodes_equal_single_node(lw, reference, runs, tmp_path):
    """Node 1 starts first and waits for the master; the last rank (which logs) is on node
    1. Both nodes write into one OUTPUT_BASEPATH, as on PAI-DLC's shared storage."""
    from megatron_patch.training.launch_plan import free_port
    out = str(tmp_path / "out")
    port = free_port()
    cmd = H.args(lw, out, tp=2, pp=2, iters=ITERS, env_name="dlc")
    node1 = H.popen(cmd, _dlc_env(1, port, KUBERNETES_CONTAINER_RESOURCE_GPU=2),
                    str(tmp_path / "node1.out"), str(tmp_path))
    time.sleep(1.0)
    node0 = H.popen(cmd, _dlc_env(0, port, MP_NPROC=2), str(tmp_path / "node0.out"),
                    str(tmp_path))
    try:
        rc0, rc1 = node0.wait(timeout=600), node1.wait(timeout=600)
    finally:
        for p in (node0, node1):
            if p.poll() is None:
                p.kill()
    text0, text1 = open(tmp_path / "node0.out").read(), open(tmp_path / "node1.out").read()
    assert rc0 == 0 and rc1 == 0, text0[-2000:] + text1[-3000:]
    assert "2 node(s) x 2 process(es)" in text0 and "2 node(s) x 2 process(es)" in text1
    assert "world size 4 (TP=2 PP=2 CP=1 DP=1)" in text1
    _assert_run_matches(out, text1, lw, reference, "dlc")
    single = runs.get("tp2_pp2")
    assert H.losses(text1) == single["losses"]  # the same layout on one node, as printed


def test_dlc_unreachable_master_fails_in_one_line(lw, tmp_path):
    from megatron_patch.training.launch_plan import free_port
    port = free_port()  # nobody listens there
    t = time.monotonic()
    rc, text, _ = H.run(H.args(lw, str(tmp_path / "out"), tp=2, pp=2, env_name="dlc"),
                        _dlc_env(1, port, MP_NPROC=2, MP_RDZV_TIMEOUT=2),
                        str(tmp_path / "node1.out"), str(tmp_path), timeout=120)
    elapsed = time.monotonic() - t
    assert rc == 2, text
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    assert lines[0].startswith("run_mcore_llama2.sh: error: ENV=dlc node 1:")
    assert f"127.0.0.1:{port} is not reachable" in lines[0] and "MP_RDZV_TIMEOUT" in lines[0]
    assert elapsed < 2 + 30, elapsed  # the timeout, plus the plan's start-up on a busy machine
    assert not os.path.exists(tmp_path / "out")  # nothing created
