"""Killing the launcher kills its workers.

torchrun starts each worker in a session of its own, so before the fix a ``kill -9`` of the
launcher's process group left both workers running: they trained on, committed checkpoints
after the kill, or waited in the rendezvous for minutes. Each test starts the real launcher
(2 gloo processes) in a new session, follows every process it starts through /proc (the
workers leave the launcher's process group, so a process-group listing would miss them),
kills it and requires the workers gone within seconds and every other process it started
(torchrun, tee) soon after.

- the whole process group, during training with a checkpoint every iteration: torchrun dies
  with the launcher, the workers with torchrun (parent-death signal); no checkpoint is
  committed after the kill;
- the launcher shell alone, while the workers start up: torchrun survives that kill, the
  workers notice the launcher is gone (watchdog) and torchrun then exits too.
"""
from __future__ import annotations

import glob
import os
import re
import signal
import time

import pytest

import layout_helpers as H

pytestmark = pytest.mark.slow  # multi-process / end-to-end

WORKER = "megatron_patch.training.pretrain"
# seconds: the workers die at once (kernel signal, or a watchdog polling every 0.5 s); the
# rest (torchrun noticing its workers died, tee) may take a while on a busy machine
WORKERS_GONE_WITHIN, ALL_GONE_WITHIN = 10.0, 60.0


def _table() -> dict:
    """pid -> (parent pid, state, command line) of every process."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            with open(f"/proc/{d}/cmdline") as f:
                cmd = f.read().replace("\0", " ")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(d)] = (int(fields[1]), fields[0], cmd)
    return out


def _descendants(root: int, table: dict) -> set:
    children = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    return found


def _alive(pids, table) -> list:
    return sorted(p for p in pids if p in table and table[p][1] not in ("Z", "X"))


# torchrun's own command line names the worker module too
TORCHRUN = ("torch.distributed.run", "megatron_patch.training.torchrun")


class Launch:
    """The launcher in a new session; ``seen`` collects every process it started."""

    def __init__(self, lw, out, nproc=2, **kw):
        os.makedirs(out, exist_ok=True)
        self.log = os.path.join(out, "launcher.out")
        self.proc = H.popen(H.args(lw, out, **kw), H.env(nproc), self.log, out,
                            new_session=True)
        self.seen: set = set()
        self.nproc = nproc

    def workers(self, table) -> list:
        return [p for p in _alive(self.seen, table)
                if WORKER in table[p][2] and not any(t in table[p][2] for t in TORCHRUN)]

    def wait_until(self, ready, timeout=180.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            table = _table()
            self.seen |= _descendants(self.proc.pid, table)
            if ready(self, table):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        pytest.fail(f"launcher not ready (exit {self.proc.poll()}):\n" + open(self.log).read()[-3000:])

    def kill_and_wait(self, group: bool) -> None:
        """Kill the launcher (its process group, or the shell alone); fail unless its
        workers are gone within WORKERS_GONE_WITHIN and every process it started within
        ALL_GONE_WITHIN seconds."""
        if group:
            os.killpg(self.proc.pid, signal.SIGKILL)
        else:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        start = time.monotonic()
        workers = set(self.workers(_table()))
        while True:
            table = _table()
            left = _alive(self.seen, table)
            waited = time.monotonic() - start
            if waited > WORKERS_GONE_WITHIN and workers & set(left):
                pytest.fail("workers survived the launcher: " + _describe(left, table))
            if not left:
                return
            if waited > ALL_GONE_WITHIN:
                pytest.fail("survived the launcher: " + _describe(left, table))
            time.sleep(0.1)

    def cleanup(self) -> None:
        for p in _alive(self.seen, _table()):
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass


@pytest.fixture(scope="module")
def lw(tmp_path_factory):
    return H.make_layout_world(tmp_path_factory.getbasetemp())


def _describe(left, table=None) -> str:
    table = table or _table()
    return "; ".join(f"{p}: {table.get(p, (0, '?', '?'))[2][:100]}" for p in left)


def test_group_kill_during_training_kills_workers(lw, tmp_path):
    """kill -9 of the launcher's process group after iteration 1, checkpoints every
    iteration: no process survives and no checkpoint appears after the kill."""
    out = str(tmp_path / "run")
    run = Launch(lw, out, iters=500, save=1)
    trained = re.compile(r"iteration\s+1/\s*500 \|")
    # training, and the first checkpoint committed (on a busy machine the log line comes
    # well before the save)
    committed = os.path.join(out, "checkpoint", "*", "latest_checkpointed_iteration.txt")
    try:
        run.wait_until(lambda r, t: len(r.workers(t)) == r.nproc
                       and trained.search(open(r.log).read()) and glob.glob(committed))
        run.kill_and_wait(group=True)
        ckdir = H.checkpoint_dir(out)
        before = sorted(os.listdir(ckdir))
        time.sleep(2.0)
        assert sorted(os.listdir(ckdir)) == before  # nobody left to commit anything
    finally:
        run.cleanup()


def test_launcher_killed_alone_during_startup_kills_workers(lw, tmp_path):
    """kill -9 of the launcher shell only (torchrun lives on), as soon as both workers
    exist: the workers and then torchrun and tee exit."""
    run = Launch(lw, str(tmp_path / "run"), iters=500)
    try:
        run.wait_until(lambda r, t: len(r.workers(t)) == r.nproc)
        run.kill_and_wait(group=False)
    finally:
        run.cleanup()
