"""Run a test body in N gloo processes, collecting results.

The body is a module-level function ``fn(rank, world_size, *args)``; its return value is
sent back (must be picklable). An exception in any rank fails the test with its traceback.

The processes come from a multiprocessing fork server that has imported torch, megatron-core
and megatron_patch once (per pytest process): a spawned process would spend ~3 s of CPU
importing them, which is most of what a small distributed test costs. The fork server holds
no thread, device or process group; each rank gets the caller's environment as it is at the
call, then initialises its own gloo group like a spawned one.
"""
from __future__ import annotations

import os
import pickle
import traceback

import torch.multiprocessing as mp


# imported once in the fork server (megatron_patch first: it selects the backend and patches
# megatron-core as it is imported)
PRELOAD = ["megatron_patch", "torch", "megatron_patch.parallel", "megatron.core.models.gpt",
           "megatron.core.optimizer", "megatron.core.pipeline_parallel",
           "megatron.core.distributed", "megatron_patch.models.llama.provider"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _worker(rank, world, port, fn, args, queue, environ):
    os.environ.clear()
    os.environ.update(environ)
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
    ctx = _context()
    queue = ctx.Queue()
    port = free_port()
    environ = dict(os.environ)
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, environ))
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
