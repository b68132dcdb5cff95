"""Fast checks (no torch, no training) of the multi-node plan, MP_RESUME_FROM, and the
guards that tie a worker to its launcher (megatron_patch/training/lifetime.py)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from test_launcher_args import NAMES, data, good_args  # noqa: F401  (data: fixture)
from train_helpers import ROOT

DLC = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "23456", "WORLD_SIZE": "2", "RANK": "1"}


def _cfg(data, env_name="dlc", **env):  # noqa: F811
    from megatron_patch.training.arguments import build_config
    args = good_args(data)
    args[NAMES.index("ENV")] = env_name
    return build_config(args, "llama3_1", env=env)


def test_processes_per_node(data):  # noqa: F811
    """MP_NPROC, else on PAI-DLC the container's GPUs (Pai reads the same variable)."""
    from megatron_patch.training.launch_plan import plan
    cfg = _cfg(data)
    p = plan(cfg, dict(DLC, KUBERNETES_CONTAINER_RESOURCE_GPU="2"))
    assert (p.NPROC, p.NNODES, p.NODE_RANK, p.DP) == (2, 2, 1, 4)
    p = plan(cfg, dict(DLC, KUBERNETES_CONTAINER_RESOURCE_GPU="2", MP_NPROC="1"))
    assert (p.NPROC, p.DP, p.RDZV_TIMEOUT) == (1, 2, 600)
    dsw = _cfg(data, "dsw")  # ENV=dsw is this machine: the DLC variable means nothing here
    assert plan(dsw, {"KUBERNETES_CONTAINER_RESOURCE_GPU": "4",
                      "MEGATRON_PATCH_BACKEND": "cpu"}).NPROC == 1
    from megatron_patch.training.config import ConfigError
    with pytest.raises(ConfigError, match="MP_RDZV_TIMEOUT='soon' is not valid"):
        plan(cfg, dict(DLC, MP_NPROC="2", MP_RDZV_TIMEOUT="soon"))
    assert plan(cfg, dict(DLC, MP_NPROC="2", MP_RDZV_TIMEOUT="5")).RDZV_TIMEOUT == 5


def test_wait_for_master():
    from megatron_patch.training.config import ConfigError
    from megatron_patch.training.launch_plan import free_port, wait_for_master
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        t = time.monotonic()
        wait_for_master("127.0.0.1", srv.getsockname()[1], 5, 1)
        assert time.monotonic() - t < 2
    port = free_port()
    t = time.monotonic()
    with pytest.raises(ConfigError, match=rf"node 1: the master .* 127.0.0.1:{port} is not "
                                          r"reachable \(Connection refused\) after 1 s"):
        wait_for_master("127.0.0.1", port, 1, 1)
    assert 1 <= time.monotonic() - t < 5


def test_resume_from_is_checked(data, tmp_path):  # noqa: F811
    from megatron_patch.training.config import ConfigError
    with pytest.raises(ConfigError, match="MP_RESUME_FROM=.*must be a training checkpoint"):
        _cfg(data, "dsw", MP_RESUME_FROM=str(tmp_path / "nothing"))
    cfg = _cfg(data, "dsw", MP_RESUME_FROM=str(data / "ckpt"))
    assert cfg.checkpoint.resume_from == str(data / "ckpt")
    # a release checkpoint holds weights only: that is PRETRAIN_CHECKPOINT_PATH's job
    assert (data / "ckpt" / "release" / "mp_rank_00" / "model_optim_rng.pt").is_file()
    from megatron_patch.training.checkpointing import find_resume
    with pytest.raises(ConfigError, match="release checkpoint .* PRETRAIN_CHECKPOINT_PATH"):
        find_resume(str(tmp_path / "own"), str(data / "ckpt"))


# ---- a worker dies with its launcher -----------------------------------------------------
# "launcher" is a python process that starts a "worker" which arms tie_to_launcher() and
# then sleeps; the worker prints its pid. No torch: a fraction of a second each.
_WORKER = ("import os, sys, time\n"
           "from megatron_patch.training.lifetime import tie_to_launcher\n"
           "tie_to_launcher()\n"
           "print(os.getpid(), flush=True)\n"
           "time.sleep(60)\n")
_LAUNCHER = ("import os, subprocess, sys, time\n"
             "env = dict(os.environ, MP_LAUNCHER_PID=str(os.getpid()) if sys.argv[1] == 'watch' "
             "else '')\n"
             "w = subprocess.Popen([sys.executable, '-c', sys.argv[2]], env=env,\n"
             "                     stdout=subprocess.PIPE, text=True, start_new_session=True)\n"
             "print(w.stdout.readline().strip(), flush=True)\n"
             "time.sleep(60)\n")


def _gone(pid, within=5.0) -> bool:
    from megatron_patch.training.lifetime import alive
    end = time.monotonic() + within
    while time.monotonic() < end:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("mode", ["parent_death", "watch"])
def test_worker_dies_with_launcher(mode):
    """parent_death: the worker's parent is SIGKILLed (the kernel's parent-death signal);
    watch: the worker's parent (an intermediate process, as torchrun is) lives on and the
    launcher named by MP_LAUNCHER_PID is SIGKILLed (the watchdog)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    worker = _WORKER
    if mode == "watch":
        # an intermediate process keeps the worker's parent alive after the launcher dies
        worker = ("import subprocess, sys, time\n"
                  f"w = subprocess.Popen([sys.executable, '-c', {_WORKER!r}], "
                  "stdout=subprocess.PIPE, text=True)\n"
                  "print(w.stdout.readline().strip(), flush=True)\n"
                  "w.wait()\n")
    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER, mode, worker], env=env,
                                stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        pid = int(launcher.stdout.readline())
        from megatron_patch.training.lifetime import alive
        assert alive(pid)
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        assert _gone(pid), f"worker {pid} outlived its launcher ({mode})"
    finally:
        if launcher.poll() is None:
            launcher.kill()


def test_alive_sees_zombies_and_recycled_pids():
    from megatron_patch.training.lifetime import _proc_stat, alive
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    start = _proc_stat(p.pid)[1]
    time.sleep(0.05)
    while _proc_stat(p.pid) and _proc_stat(p.pid)[0] != "Z":
        time.sleep(0.05)
    assert not alive(p.pid)  # exited, not yet reaped: a zombie is gone for us
    p.wait()
    assert not alive(p.pid)
    assert start.isdigit()
    assert alive(os.getpid()) and not alive(os.getpid(), start_time="-1")  # pid recycled
