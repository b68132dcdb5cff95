"""The layout matrix shared by test_parallel_layouts.py and
test_parallel_layouts_resume.py: which launcher runs exist, each run once per module on
demand, the TP=1 reference, and how a run is compared with it. (Two test files so that the
suite's two pytest workers each take half of the matrix.)"""
from __future__ import annotations

import os

import pytest

import layout_helpers as H

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
    # only DP changes (the distributed optimizer's state saved gathered from 2 DP ranks)
    "dp1_do_from_tp2_pp2_dp2_do": ("tp2_pp2_dp2_do", dict(tp=2, pp=2, do=True), 4,
                                   "TP=2 PP=2 CP=1 DP=1"),
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


def assert_close(got: dict, ref: dict, iterations, what):
    assert sorted(got) == list(iterations), (what, got)
    for i in iterations:
        assert abs(got[i] - ref[i]) <= REL * abs(ref[i]), (what, i, got, ref)


def assert_run_matches(out, text, lw, reference, what, iterations=range(1, ITERS + 1)):
    """Losses (the log) and gradient norms (TensorBoard) at every iteration, then the
    weights after the last one."""
    assert_close(H.losses(text), reference["losses"], iterations, what + " loss")
    assert_close(H.grad_norms(out), reference["grad_norms"], iterations, what + " grad norm")
    got = H.full_weights(H.checkpoint_dir(out), lw.arch())
    ref, init = reference["weights"], reference["initial"]
    assert sorted(got) == sorted(ref), what
    for k in ref:
        update = (ref[k] - init[k]).norm()
        assert update > 0, k
        err = float((got[k] - ref[k]).norm() / update)
        assert err <= W_REL, f"{what}: {k} differs from TP=1 by {err:.2e} of its update"


def dlc_env(rank, port, **extra):
    return H.launcher_env(MP_EVAL_ITERS=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                          WORLD_SIZE=2, RANK=rank, **extra)




def check_layout(runs, reference, lw, name):
    """One LAYOUTS run: it ran in the layout asked for, wrote that many rank directories,
    and equals the TP=1 reference (losses, gradient norms, final weights)."""
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
    assert_run_matches(r["out"], r["text"], lw, reference, name)
