"""Small file operations that never leave a half-written file under its final name
(standard library only): write to a temporary name in the same directory, then rename."""
from __future__ import annotations

import errno
import filecmp
import json
import os
import re
import shutil
from contextlib import contextmanager


def _tmp(path: str) -> str:
    return os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp{os.getpid()}")


def _named(exc: OSError, path: str) -> OSError:
    """The error with the file it was about: a write on a full disk raises ENOSPC naming no
    file, and a user must learn which one (the final name, not our temporary one)."""
    if exc.errno is None or (exc.filename and public_path(exc.filename) != path):
        return exc
    return type(exc)(exc.errno, exc.strerror, path)


@contextmanager
def _replaced(path: str):
    """Yield a temporary name next to ``path``; once the body has written it, it replaces
    ``path``. An OSError names ``path``; the temporary file never stays behind."""
    tmp = _tmp(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise _named(e, path) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_copy(src: str, dst: str) -> None:
    """Copy src to dst; a crash leaves dst as it was (absent or the old file), never cut."""
    with _replaced(dst) as tmp:
        shutil.copyfile(src, tmp)
        shutil.copymode(src, tmp)


def atomic_write_json(path: str, obj, indent: int = 2) -> None:
    with _replaced(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent)
            f.write("\n")


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


_OS_ERRORS = {  # errno -> (what happened, what to do)
    errno.ENOSPC: ("no space left on device, the disk is full",
                   "free space there or choose another output directory; nothing was published"),
    errno.EDQUOT: ("disk quota exceeded", "free space there or choose another output directory"),
    errno.EACCES: ("permission denied", "choose a location you can write to (or read)"),
    errno.EPERM: ("operation not permitted", "choose a location you can write to"),
    errno.EROFS: ("read-only file system", "choose a writable output directory"),
    errno.EEXIST: ("a file is in the way where a directory is needed",
                   "remove it or choose another path"),
    errno.ENOTDIR: ("a part of the path is a file, not a directory", "choose another path"),
    errno.EISDIR: ("a directory, not a file", "give a file name"),
    errno.ENOENT: ("no such file or directory", None),
}


def os_error_message(exc: OSError, path=None) -> str:
    """One line for an OSError met while reading or writing ``path`` (default: the error's
    own file name; "" for none): "what (path): what to do". Our temporary names are
    replaced by the real ones."""
    name = path if path is not None else exc.filename
    what, advice = _OS_ERRORS.get(exc.errno, (exc.strerror or str(exc), None))
    msg = what + (f" ({public_path(name)})" if name else "")
    return msg + (f": {advice}" if advice else "")
