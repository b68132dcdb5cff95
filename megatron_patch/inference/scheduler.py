"""Serving loop: requests from any number of client threads, decoded in batches by the engine
on every rank of the model-parallel group.

Rank 0 owns the queue. Its loop takes up to ``max_batch_size`` waiting jobs (one job = one
prompt), broadcasts them to the other ranks and all ranks decode them together; text goes
back to each job's ``sink`` (rank 0 only) as it is made. A batch runs until its last row is
done; jobs that arrive meanwhile wait for the next batch (static batching: the KV cache of
megatron-core's static context is sized per batch).

While idle, rank 0 still broadcasts every ``idle_s`` seconds, so the other ranks never sit
in one collective long enough to hit the process group's timeout, and a shutdown is seen
within that time.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch.distributed as dist

from megatron_patch.inference.sampling import SamplingParams
from megatron_patch.inference.text_stream import TextStream

log = logging.getLogger("megatron_patch.server")

_IDLE, _EXIT = "idle", "exit"


@dataclass
class Job:
    """What every rank needs to decode one prompt (picklable: it is broadcast)."""
    id: int
    prompt: List[int]
    params: SamplingParams
    stop: List[str] = field(default_factory=list)


# events sent to a job's sink: ("text", str) while decoding, then
# ("done", str, finish_reason, completion_tokens), or ("error", message)
Sink = Callable[[tuple], None]


def run_jobs(engine, tokenizer, eos_ids, jobs: List[Job],
             sinks: Optional[Dict[int, Sink]] = None) -> None:
    """Decode ``jobs`` as one batch (every rank calls this with the same jobs)."""
    streams = [TextStream(tokenizer, j.prompt, eos_ids, j.stop) for j in jobs]

    def on_token(row, token):
        text = streams[row].push(token)
        if sinks is not None and text:
            sinks[jobs[row].id](("text", text))

    # stop strings end a row on every rank alike: each rank decodes the same tokens
    stops = [(lambda _new, s=s: s.finished) if j.stop else None for j, s in zip(jobs, streams)]
    engine.generate_batch([j.prompt for j in jobs], [j.params for j in jobs], eos_ids=eos_ids,
                          stops=stops, on_token=on_token)
    if sinks is not None:
        for j, s in zip(jobs, streams):
            tail = s.close()
            sinks[j.id](("done", tail, "stop" if s.finished else "length", s.num_tokens))


class BatchScheduler:
    def __init__(self, engine, tokenizer, eos_ids, max_batch_size: Optional[int] = None,
                 batch_wait_s: float = 0.01, idle_s: float = 1.0):
        self.engine, self.tok, self.eos = engine, tokenizer, list(eos_ids)
        self.max_batch_size = max_batch_size or engine.max_batch_size
        self.batch_wait_s, self.idle_s = batch_wait_s, idle_s
        self._queue: deque = deque()
        self._sinks: Dict[int, Sink] = {}
        self._cv = threading.Condition()
        self._ids = itertools.count()
        self.batches: List[int] = []  # size of each batch run (for logs and tests)

    # ---- client side (any thread, rank 0) -------------------------------------------------
    def submit(self, prompt: List[int], params: SamplingParams, stop: List[str],
               sink: Sink) -> None:
        with self._cv:
            job = Job(next(self._ids), list(prompt), params, list(stop))
            self._sinks[job.id] = sink
            self._queue.append(job)
            self._cv.notify()

    def _take(self) -> List[Job]:
        with self._cv:
            if not self._queue:
                self._cv.wait(self.idle_s)
            if not self._queue:
                return []
        time.sleep(self.batch_wait_s)  # let requests sent together arrive together
        with self._cv:
            n = min(self.max_batch_size, len(self._queue))
            return [self._queue.popleft() for _ in range(n)]

    # ---- the loop (main thread, every rank) -------------------------------------------------
    def serve(self, should_stop: Callable[[], bool]) -> None:
        """Rank 0: until ``should_stop()``; other ranks: until rank 0 says so."""
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        multi = dist.is_initialized() and dist.get_world_size() > 1
        while True:
            msg = None
            if rank0:
                jobs = [] if should_stop() else self._take()
                msg = jobs or (_EXIT if should_stop() else _IDLE)
            if multi:
                box = [msg]
                dist.broadcast_object_list(box, src=0)
                msg = box[0]
            if msg == _EXIT:
                return
            if msg == _IDLE:
                continue
            self._run(msg, rank0)

    def _run(self, jobs: List[Job], rank0: bool) -> None:
        sinks = {j.id: self._sinks.pop(j.id) for j in jobs} if rank0 else None
        t0 = time.perf_counter()
        try:
            run_jobs(self.engine, self.tok, self.eos, jobs, sinks)
        except Exception as e:  # the server goes on; these clients get a 500
            log.exception("batch of %d failed", len(jobs))
            for sink in (sinks or {}).values():
                sink(("error", f"generation failed: {e}"))
            return
        self.batches.append(len(jobs))
        if rank0:
            log.info("batch of %d request(s) done in %.2f s", len(jobs),
                     time.perf_counter() - t0)
