"""Small file operations that never leave a half-written file under its final name
(standard library only): write to a temporary name in the same directory, then rename."""
from __future__ import annotations

import filecmp
import json
import os
import shutil


def _tmp(path: str) -> str:
    return os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp{os.getpid()}")


def atomic_copy(src: str, dst: str) -> None:
    """Copy src to dst; a crash leaves dst as it was (absent or the old file), never cut."""
    tmp = _tmp(dst)
    try:
        shutil.copyfile(src, tmp)
        shutil.copymode(src, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(path: str, obj, indent: int = 2) -> None:
    tmp = _tmp(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def sync_copy(src: str, dst: str) -> bool:
    """Make dst an exact copy of src (atomically) unless it already is; True if copied.
    Repairs a truncated or stale copy left by an earlier crash."""
    if os.path.isfile(dst) and os.path.getsize(dst) == os.path.getsize(src) and \
            filecmp.cmp(src, dst, shallow=False):
        return False
    atomic_copy(src, dst)
    return True
