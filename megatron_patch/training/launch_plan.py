"""The launch plan: how many processes on how many nodes, and the checks that need the
process count (TP x PP x CP against the world size, GLOBAL_BATCH_SIZE against BATCH_SIZE x
data-parallel size, virtual-pipeline micro-batches) -- all before torchrun starts.

    python -m megatron_patch.training.launch_plan <generation> <the 25 launcher arguments>

prints shell assignments ``MP_PLAN_<NAME>='value'`` for run_mcore_llama.sh to eval, or one
line ``<launcher>: error: ...`` on stderr and exit status 2. Standard library only.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from megatron_patch.ports import free_port

from .arguments import _err, _int, build_config, check_model_shape
from .config import ConfigError, TrainConfig


@dataclass
class LaunchPlan:
    NPROC: int          # processes per node
    NNODES: int
    NODE_RANK: int
    MASTER_ADDR: str
    MASTER_PORT: int
    DP: int             # data-parallel size
    RUN_NAME: str
    TIMESTAMP: str
    CHECKPOINT_DIR: str
    TENSORBOARD_DIR: str
    LOG_FILE: str
    TRAIN_ITERS: int
    WARMUP_ITERS: int
    RDZV_TIMEOUT: int   # seconds a node waits for the others (MP_RDZV_TIMEOUT)


DEFAULT_RDZV_TIMEOUT = 600  # torchrun's own default for the static rendezvous


def local_device_count(env, dlc: bool = False) -> int:
    """Processes per node: MP_NPROC, else (ENV=dlc) the GPUs PAI-DLC gives the container
    (KUBERNETES_CONTAINER_RESOURCE_GPU, what Pai's scripts read), else the visible GPUs/NPUs,
    else 1."""
    if env.get("MP_NPROC"):
        return _int("MP_NPROC", env["MP_NPROC"])
    if dlc and env.get("KUBERNETES_CONTAINER_RESOURCE_GPU"):
        return _int("KUBERNETES_CONTAINER_RESOURCE_GPU", env["KUBERNETES_CONTAINER_RESOURCE_GPU"])
    if (env.get("MEGATRON_PATCH_BACKEND") or "auto").lower() == "cpu":
        return 1
    for var in ("CUDA_VISIBLE_DEVICES", "ASCEND_RT_VISIBLE_DEVICES"):
        v = env.get(var)
        if v is not None and v.strip() not in ("", "-1"):
            return len([x for x in v.split(",") if x.strip()])
    for cmd in (["nvidia-smi", "-L"], ["npu-smi", "info", "-l"]):
        if shutil.which(cmd[0]):
            try:
                outp = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout
            except (OSError, subprocess.SubprocessError):
                continue
            n = len(re.findall(r"^GPU \d+", outp, re.M)) if cmd[0] == "nvidia-smi" else \
                len(re.findall(r"NPU ID", outp))
            if n:
                return n
    return 1


def check_batches(cfg: TrainConfig, dp: int) -> int:
    """Micro-batches per step (GBS / (MBS x DP)), checked; the trainer calls it too."""
    d = cfg.data
    if d.global_batch_size % (d.micro_batch_size * dp):
        raise _err("GLOBAL_BATCH_SIZE", d.global_batch_size, f"must be a multiple of "
                   f"BATCH_SIZE={d.micro_batch_size} x data-parallel size {dp} "
                   f"(= processes / (TP x PP x CP))")
    nmb = d.global_batch_size // (d.micro_batch_size * dp)
    if cfg.parallel.vp and nmb % cfg.parallel.pp:
        raise _err("GLOBAL_BATCH_SIZE", d.global_batch_size, f"with MP_VP the {nmb} "
                   f"micro-batches per step must be a multiple of PP={cfg.parallel.pp}")
    return nmb


def plan(cfg: TrainConfig, env) -> LaunchPlan:
    nproc = local_device_count(env, dlc=cfg.env == "dlc")
    rdzv_timeout = _int("MP_RDZV_TIMEOUT", env["MP_RDZV_TIMEOUT"]) \
        if env.get("MP_RDZV_TIMEOUT") else DEFAULT_RDZV_TIMEOUT
    if cfg.env == "dlc":
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")
                   if not env.get(v)]
        if missing:
            raise ConfigError(f"ENV='dlc' needs the PAI-DLC variables {', '.join(missing)} "
                              "(MASTER_ADDR, MASTER_PORT, WORLD_SIZE = nodes, RANK = node rank)")
        nnodes = _int("WORLD_SIZE", env["WORLD_SIZE"])
        node_rank = _int("RANK", env["RANK"], 0)
        if node_rank >= nnodes:
            raise _err("RANK", node_rank, f"the node rank must be < WORLD_SIZE={nnodes} nodes")
        master_addr, master_port = env["MASTER_ADDR"], _int("MASTER_PORT", env["MASTER_PORT"])
    else:
        nnodes, node_rank, master_addr = 1, 0, "localhost"
        # a free port (MASTER_PORT of the surrounding environment may belong to another job)
        master_port = _int("MP_MASTER_PORT", env["MP_MASTER_PORT"]) \
            if env.get("MP_MASTER_PORT") else free_port()
    world = nnodes * nproc
    try:
        dp = check_model_shape(cfg, world_size=world)
    except ConfigError as e:
        if "processes" in str(e):
            raise ConfigError(f"{e} ({nnodes} node(s) x {nproc}; set MP_NPROC on CPU)") from None
        raise
    check_batches(cfg, dp)
    return LaunchPlan(NPROC=nproc, NNODES=nnodes, NODE_RANK=node_rank, MASTER_ADDR=master_addr,
                      MASTER_PORT=master_port, DP=dp, RUN_NAME=cfg.run_name,
                      TIMESTAMP=cfg.timestamp, CHECKPOINT_DIR=cfg.checkpoint_dir,
                      TENSORBOARD_DIR=cfg.tensorboard_dir, LOG_FILE=cfg.log_file,
                      TRAIN_ITERS=cfg.optim.train_iters, WARMUP_ITERS=cfg.optim.warmup_iters,
                      RDZV_TIMEOUT=rdzv_timeout)


def wait_for_master(addr: str, port: int, timeout: float, node_rank: int) -> None:
    """ENV=dlc, node rank > 0: wait until the master's rendezvous port accepts connections
    (node 0 may start later), else one clear error instead of torchrun's traceback."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((addr, port), timeout=min(5.0, max(0.1, timeout))):
                return
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    why = last.strerror if isinstance(last, OSError) and last.strerror else str(last)
    raise ConfigError(f"ENV=dlc node {node_rank}: the master MASTER_ADDR:MASTER_PORT = "
                      f"{addr}:{port} is not reachable ({why}) after {timeout:g} s "
                      f"(MP_RDZV_TIMEOUT); is node 0 of this job running?")


def _shell_quote(v) -> str:
    return "'" + str(v).replace("'", "'\\''") + "'"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = os.environ.get("MP_LAUNCHER_NAME", "run_mcore_llama.sh")
    if len(argv) < 1:
        print(f"{prog}: usage: python -m megatron_patch.training.launch_plan <generation> "
              "<25 arguments>", file=sys.stderr)
        return 2
    try:
        cfg = build_config(argv[1:], argv[0])
        p = plan(cfg, os.environ)
        if p.NODE_RANK > 0:
            wait_for_master(p.MASTER_ADDR, p.MASTER_PORT, p.RDZV_TIMEOUT, p.NODE_RANK)
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    for k, v in asdict(p).items():
        print(f"MP_PLAN_{k}={_shell_quote(v)}")
    return 0  # cfg.notes are printed by the trainer, into the log


if __name__ == "__main__":
    sys.exit(main())
