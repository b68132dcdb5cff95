"""Run a test body in N gloo processes (torch.multiprocessing spawn), collecting results.

The body is a module-level function ``fn(rank, world_size, *args)``; its return value is
sent back (must be picklable). An exception in any rank fails the test with its traceback.
"""
from __future__ import annotations

import os
import pickle
import traceback

import torch.multiprocessing as mp


def _worker(rank, world, port, fn, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    try:
        import torch
        torch.set_num_threads(1)
        import megatron_patch  # noqa: F401  (activates the backend)
        from megatron_patch import parallel
        parallel.init_distributed()
        result = fn(rank, world, *args)
        # plain pickle bytes: torch.multiprocessing would pass tensors through shared memory
        # that disappears when this process exits
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
        raise
    finally:
        try:
            from megatron_patch import parallel
            parallel.destroy()
        except Exception:
            pass


def run_distributed(fn, world_size: int, *args, timeout: float = 300):
    from megatron_patch.parallel import free_port
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    for _ in procs:
        try:
            rank, status, payload = queue.get(timeout=timeout)
        except Exception as exc:
            errors.append(f"no answer from a rank ({exc!r})")
            break
        if status == "ok":
            results[rank] = pickle.loads(payload)
        else:
            errors.append(f"rank {rank}:\n{payload}")
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    if errors:
        raise AssertionError("distributed test failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
