"""Small file operations that never leave a half-written file under its final name
(standard library only): write to a temporary name in the same directory, then rename."""
from __future__ import annotations

import errno
import filecmp
import json
import os
import re
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


# ---- OS errors as one line for the user ---------------------------------------------------
# Temporary names our writers use beside the real one (file.tmp123, .file.tmp123,
# .staging.iter_0000005, .target.staging-123, target.old-123): a message names the real one.
_END = r"(?![\w.-])"  # the end of a name: inside a path or a message
_TMP_PARTS = (
    (re.compile(r"(^|/)\.staging\.(iter_\d+|release)" + _END), r"\1\2"),
    (re.compile(r"(^|/)\.([^/\s'\"]+)\.staging-\d+" + _END), r"\1\2"),
    (re.compile(r"(^|/)\.([^/\s'\"]+)\.tmp\d+" + _END), r"\1\2"),
    (re.compile(r"\.(tmp|old)-?\d+" + _END), ""),
)


def public_path(path) -> str:
    """``path`` (or a message holding paths) with our temporary/staging names replaced by
    the names the user will see."""
    p = os.fspath(path)
    for pattern, repl in _TMP_PARTS:
        p = pattern.sub(repl, p)
    return p


def os_error_message(exc: OSError, path=None) -> str:
    """One line for an OSError met while reading or writing ``path`` (default: the error's
    own file name): what happened, where, and what to do. Internal temporary names are
    replaced by the real ones."""
    where = public_path(path if path is not None else (exc.filename or "?"))
    code = exc.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on device (disk full) while writing {where}: free space "
                "there or choose another output directory; nothing was published")
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied: {where}: choose a location you can write to (or read)"
    if code == errno.EROFS:
        return f"read-only file system: {where}: choose a writable output directory"
    if code == errno.EEXIST:
        return (f"{where} exists and is a file where a directory is needed: remove it or "
                "choose another path")
    if code == errno.ENOTDIR:
        return f"{where}: a part of this path is a file, not a directory: choose another path"
    if code == errno.EISDIR:
        return f"{where} is a directory: give a file name"
    if code == errno.ENOENT:
        return f"{where}: no such file or directory"
    return f"{where}: {exc.strerror or exc}"
