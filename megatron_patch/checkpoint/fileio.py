"""Moving bytes between files without passing them through Python objects.

``copy_range`` uses ``os.copy_file_range`` (the kernel copies page-cache pages, as ``cp``
does), falling back to pread/write where the kernel or filesystem refuses. A conversion
that only re-arranges whole rows of tensors (TP=1 layouts, column-parallel shards, vocab
padding) is then as cheap as copying the files.
"""
from __future__ import annotations

import os

_CHUNK = 64 * 2**20
_ZEROS = bytes(2**20)


def write_all(fd: int, data) -> int:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.write(fd, view[done:])
    return done


def write_zeros(fd: int, nbytes: int) -> None:
    while nbytes > 0:
        n = min(nbytes, len(_ZEROS))
        write_all(fd, _ZEROS[:n])
        nbytes -= n


def copy_range(src_fd: int, src_offset: int, dst_fd: int, nbytes: int) -> None:
    """Append ``nbytes`` of ``src_fd`` starting at ``src_offset`` at dst_fd's position."""
    while nbytes > 0:
        try:
            n = os.copy_file_range(src_fd, dst_fd, min(nbytes, 2**30), src_offset)
        except (OSError, AttributeError):
            n = 0
        if n <= 0:  # not supported here (or a short read at EOF): plain copy
            _copy_plain(src_fd, src_offset, dst_fd, nbytes)
            return
        src_offset += n
        nbytes -= n


def _copy_plain(src_fd, src_offset, dst_fd, nbytes):
    while nbytes > 0:
        buf = os.pread(src_fd, min(nbytes, _CHUNK), src_offset)
        if not buf:
            raise IOError(f"unexpected end of file at offset {src_offset}")
        write_all(dst_fd, buf)
        src_offset += len(buf)
        nbytes -= len(buf)


def write_segments(dst_fd: int, segments) -> int:
    """Append segments [(src_fd or None for zeros, src_offset, nbytes)]; returns bytes."""
    total = 0
    for fd, off, n in segments:
        if fd is None:
            write_zeros(dst_fd, n)
        else:
            copy_range(fd, off, dst_fd, n)
        total += n
    return total


def read_exact(fd: int, offset: int, out) -> None:
    """Fill the writable buffer ``out`` from ``fd`` at ``offset`` (no memory map)."""
    view, got = memoryview(out).cast("B"), 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise IOError(f"unexpected end of file at offset {offset + got}")
        got += n


class Segments:
    """Bytes made of segments, for writers that take ``nbytes`` + ``write_to(fd)``."""

    def __init__(self, segments):
        self.segments = list(segments)
        self.nbytes = sum(n for _, _, n in self.segments)

    def write_to(self, fd: int) -> int:
        return write_segments(fd, self.segments)
