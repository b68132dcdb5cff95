"""Ordered parallel map for the preprocessing tools.

Results come back in task order whatever the number of workers, so the output files do not
depend on ``--workers``. At most ``2 * workers`` tasks are in flight, so a huge input is never
read ahead into memory (``Pool.imap`` would queue every task at once).

Workers are forked where the platform allows: the tokenizer already loaded in the parent is
inherited instead of being pickled or reloaded (and ``import megatron_patch`` is not paid again).
"""
from __future__ import annotations

import collections
import multiprocessing as mp
import os
from typing import Callable, Iterable, Iterator

_STATE = None


def worker_state():
    """The object given to ``ordered_map(state=...)``, inside a worker (or in-process)."""
    return _STATE


def _init(state) -> None:
    global _STATE
    _STATE = state
    # one Rust thread per worker: the workers are the parallelism
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _context():
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods else "spawn")


def ordered_map(fn: Callable, tasks: Iterable, workers: int, state=None) -> Iterator:
    """Yield ``fn(task)`` for every task, in order. ``fn`` must be a module-level function;
    it reads shared read-only data with ``worker_state()``."""
    if workers < 1:
        raise ValueError("workers must be >= 1")
    if workers == 1:
        global _STATE
        previous = _STATE
        _init(state)
        try:
            for task in tasks:
                yield fn(task)
        finally:
            _STATE = previous
        return
    pool = _context().Pool(workers, initializer=_init, initargs=(state,))
    try:
        pending: collections.deque = collections.deque()
        for task in tasks:
            pending.append(pool.apply_async(fn, (task,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()
