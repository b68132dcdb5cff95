"""A training worker dies with its launcher.

torchrun starts every worker in a session of its own, so a signal to the launcher's process
group (``kill -9 -PGID``, a scheduler stopping the job, a closed terminal) never reaches the
workers: such orphans were seen training on, committing a checkpoint after the kill, or
waiting minutes in the rendezvous. ``tie_to_launcher()`` runs first thing in every worker,
before torch is imported, and arms two guards:

- the kernel's parent-death signal (``prctl(PR_SET_PDEATHSIG, SIGKILL)``): the worker is
  killed the moment its parent -- torchrun, or for one process the launcher's shell -- dies;
- a watchdog thread that SIGKILLs the worker once the launcher shell itself
  (``MP_LAUNCHER_PID``, exported by run_mcore_llama.sh) is gone, for a launcher killed alone
  while torchrun lives on. A zombie counts as gone; the process start time guards against
  a recycled pid.

SIGKILL rather than SIGTERM: a worker blocked in a collective would not run a Python signal
handler, and the checkpoint writer is crash-safe (staging directory, tracker last).
Linux only (prctl, /proc); elsewhere nothing is armed. Standard library only.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from typing import Optional

PR_SET_PDEATHSIG = 1
LAUNCHER_PID_ENV = "MP_LAUNCHER_PID"
POLL_SECONDS = 0.5


def _proc_stat(pid: int) -> Optional[tuple]:
    """(state, start time) of a live process from /proc/<pid>/stat, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may contain spaces
    return fields[0], fields[19]  # state, starttime (fields 3 and 22 of proc(5))


def alive(pid: int, start_time: Optional[str] = None) -> bool:
    st = _proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X") and \
        (start_time is None or st[1] == start_time)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _set_parent_death_signal() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(pid: int, start_time: str) -> None:
    stop = threading.Event()
    while not stop.wait(POLL_SECONDS):
        if not alive(pid, start_time):
            _die()


def tie_to_launcher(environ=None) -> None:
    """Arm both guards in this process (a training worker; call it once, first thing)."""
    if not sys.platform.startswith("linux"):
        return
    environ = os.environ if environ is None else environ
    parent = os.getppid()
    _set_parent_death_signal()
    if os.getppid() != parent:  # the parent died before the signal was armed
        _die()
    pid = environ.get(LAUNCHER_PID_ENV, "")
    if not pid.isdigit():
        return
    st = _proc_stat(int(pid))
    if st is None or st[0] in ("Z", "X"):
        _die()
    threading.Thread(target=_watch, args=(int(pid), st[1]), daemon=True,
                     name="launcher-watchdog").start()
