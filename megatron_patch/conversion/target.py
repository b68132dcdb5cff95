"""TARGET handling: refuse what would lose data, build beside TARGET, swap in at the end.

A conversion never leaves a partial TARGET: everything is written into a hidden staging
directory next to it (same filesystem, so the final rename is atomic) and renamed into
place only once complete (and checked, with CHECK=true). An existing non-empty TARGET is
replaced only with MP_OVERWRITE=1, and only after the new one is complete.
"""
from __future__ import annotations

import os
import shutil

from .errors import UsageError


def _inside(path: str, parent: str) -> bool:
    path, parent = os.path.realpath(path), os.path.realpath(parent)
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def check_target(req) -> None:
    t = req.target
    if os.path.exists(t) and not os.path.isdir(t):
        raise UsageError(f"TARGET_CKPT_PATH={t} is an existing file, not a directory: remove "
                         f"it or give a new directory name")
    up = os.path.dirname(os.path.abspath(t))
    while up and not os.path.exists(up):
        up = os.path.dirname(up)
    if up and not os.path.isdir(up):
        raise UsageError(f"TARGET_CKPT_PATH={t}: {up} is a file, not a directory: choose "
                         f"another TARGET")
    for name, p in (("SOURCE_CKPT_PATH", req.source), ("HF_CKPT_PATH", req.hf_path)):
        if p and _inside(p, t):
            raise UsageError(f"TARGET_CKPT_PATH={t} contains {name}={p}; choose another TARGET")
    if os.path.isdir(t) and os.listdir(t) and not req.overwrite:
        raise UsageError(f"TARGET_CKPT_PATH={t} is not empty; set MP_OVERWRITE=1 to replace it")


def make_staging(target: str) -> str:
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    path = os.path.join(parent, f".{os.path.basename(os.path.abspath(target))}.staging-{os.getpid()}")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def publish(staging: str, target: str) -> None:
    old = None
    if os.path.exists(target):
        old = f"{os.path.abspath(target)}.old-{os.getpid()}"
        os.replace(target, old)
    os.replace(staging, target)
    if old:
        shutil.rmtree(old, ignore_errors=True)
