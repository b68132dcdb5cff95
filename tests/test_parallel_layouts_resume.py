"""Parallel layouts at launcher level, continued from test_parallel_layouts.py (same model,
same TP=1 reference and tolerances, tests/layout_matrix.py): TP2xPP2 and the 8-process
TP2xPP2xDP2 with the distributed optimizer, the re-sharding resumes from their iteration-2
checkpoints, and ENV=dlc.

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
import layout_matrix as M
from layout_matrix import lw, reference, runs  # noqa: F401  (module fixtures)

pytestmark = pytest.mark.slow  # multi-process / end-to-end

HERE = [n for n in M.LAYOUTS if n not in {"dp2_pp2", "tp2_dp2_do", "pp2_vp2_dp2",
                                         "tp2_pp2_sp", "pp4_uneven", "tp4"}]


@pytest.mark.parametrize("name", HERE)
def test_layout_equals_tp1_feeding_resumes(runs, reference, lw, name):
    M.check_layout(runs, reference, lw, name)


@pytest.mark.parametrize("name", list(M.RESUMES))
def test_resume_in_another_layout_equals_uninterrupted_tp1(runs, reference, lw, name):
    r = runs.get(name)
    assert r["rc"] == 0, r["text"][-3000:]
    assert "resuming from" in r["text"] and "iter_0000002 (iteration 2)" in r["text"]
    assert M.RESUMES[name][3] + ")" in r["text"], r["text"][:3000]
    M.assert_run_matches(r["out"], r["text"], lw, reference, name, range(3, M.ITERS + 1))


def test_dlc_two_nodes_equal_single_node(lw, reference, runs, tmp_path):
    """Node 1 starts first and waits for the master; the last rank (which logs) is on node
    1. Both nodes write into one OUTPUT_BASEPATH, as on PAI-DLC's shared storage."""
    from megatron_patch.training.launch_plan import free_port
    out = str(tmp_path / "out")
    port = free_port()
    cmd = H.args(lw, out, tp=2, pp=2, iters=M.ITERS, env_name="dlc")
    node1 = H.popen(cmd, M.dlc_env(1, port, KUBERNETES_CONTAINER_RESOURCE_GPU=2),
                    str(tmp_path / "node1.out"), str(tmp_path))
    time.sleep(1.0)
    node0 = H.popen(cmd, M.dlc_env(0, port, MP_NPROC=2), str(tmp_path / "node0.out"),
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
    M.assert_run_matches(out, text1, lw, reference, "dlc")
    single = runs.get("tp2_pp2")
    assert H.losses(text1) == single["losses"]  # the same layout on one node, as printed


def test_dlc_unreachable_master_fails_in_one_line(lw, tmp_path):
    from megatron_patch.training.launch_plan import free_port
    port = free_port()  # nobody listens there
    t = time.monotonic()
    rc, text, _ = H.run(H.args(lw, str(tmp_path / "out"), tp=2, pp=2, env_name="dlc"),
                        M.dlc_env(1, port, MP_NPROC=2, MP_RDZV_TIMEOUT=2),
                        str(tmp_path / "node1.out"), str(tmp_path), timeout=120)
    elapsed = time.monotonic() - t
    assert rc == 2, text
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    assert lines[0].startswith("run_mcore_llama2.sh: error: ENV=dlc node 1:")
    assert f"127.0.0.1:{port} is not reachable" in lines[0] and "MP_RDZV_TIMEOUT" in lines[0]
    assert elapsed < 2 + 30, elapsed  # the timeout, plus the plan's start-up on a busy machine
    assert not os.path.exists(tmp_path / "out")  # nothing created


def test_dlc_node0_alone_fails_in_one_line(lw, tmp_path):
    """Node 0 waits MP_RDZV_TIMEOUT for node 1, which never comes: one line saying how many
    nodes joined, no torchrun traceback."""
    from megatron_patch.training.launch_plan import free_port
    rc, text, _ = H.run(H.args(lw, str(tmp_path / "out"), pp=2, env_name="dlc"),
                        M.dlc_env(0, free_port(), MP_NPROC=1, MP_RDZV_TIMEOUT=2),
                        str(tmp_path / "node0.out"), str(tmp_path), timeout=120)
    assert rc == 2 and "Traceback" not in text, text
    last = text.strip().splitlines()[-1]
    assert last == ("run_mcore_llama2.sh: error: ENV=dlc node 0: only 1 of 2 nodes joined "
                    "within 2 s (MP_RDZV_TIMEOUT); start the other nodes with the same "
                    "MASTER_ADDR, MASTER_PORT and WORLD_SIZE=2 (RANK=1), or raise "
                    "MP_RDZV_TIMEOUT"), text
