"""megatron-core's dataset index cache (``<cache>/<hash>-<Dataset>-<split>-*.npy`` plus a
description file) is written with plain ``numpy.save``: a crash in the middle leaves a cut
file, and every later start fails on it ("mmap length is greater than file size") because
megatron only checks that the files exist. ``repair_index_cache`` runs before the datasets
are built (on the rank that builds them) and removes every cache entry one of whose files
is damaged, so megatron rebuilds exactly those."""
from __future__ import annotations

import os
import re
from typing import List

import numpy as np

# <hash>-<DatasetClass>-<split>-<affix>
_ENTRY = re.compile(r"^(?P<base>[0-9a-f]+-\w+-\w+)-(?P<affix>[\w]+\.(?:npy|txt))$")


def npy_problem(path: str):
    """None when the .npy file holds the whole array its header announces, else why."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                           np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(f)
            header_end = f.tell()
        need = header_end + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        have = os.path.getsize(path)
        if have < need:
            return f"cut ({have} of {need} bytes)"
    except (ValueError, OSError, EOFError) as e:
        return f"unreadable ({e})"
    return None


def repair_index_cache(cache_dir: str) -> List[str]:
    """Remove damaged cache entries (all files of an entry); returns the removed bases."""
    if not cache_dir or not os.path.isdir(cache_dir):
        return []
    entries = {}
    for name in os.listdir(cache_dir):
        m = _ENTRY.match(name)
        if m:
            entries.setdefault(m.group("base"), []).append(name)
    removed = []
    for base, names in sorted(entries.items()):
        bad = any((n.endswith(".npy") and npy_problem(os.path.join(cache_dir, n))) or
                  (n.endswith(".txt") and os.path.getsize(os.path.join(cache_dir, n)) == 0)
                  for n in names)
        if bad:
            for n in names:
                os.remove(os.path.join(cache_dir, n))
            removed.append(base)
    return removed
