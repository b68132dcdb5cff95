"""Turn a mapping step into byte copies when it only moves blocks of bytes.

The conversion re-arranges data: fused qkv and gate/up concatenate row blocks, TP shards
are row ranges (column-parallel) or column blocks (row-parallel), vocab padding appends
zero rows, TP=1 tensors are copied as they are. Running the mapping function itself on
tensors of *block ids* (one id per row and column block, shape [rows, blocks]) tells where
each output block comes from, without a second description of the layouts.

Writing a BlockPlan: when the output is a few long runs of consecutive source blocks, each
run is copied file-to-file inside the kernel (``os.copy_file_range``, as ``cp`` does); when
it is many small pieces (a column block per matrix row), the source tensors are read once
(shared by all TP ranks of the step) and the output gathered with one indexing operation.
A dtype change, or a function that is not a pure re-arrangement of whole blocks, gives
None and the caller computes on tensors instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from megatron_patch.checkpoint import fileio

_ID = 1 << 40       # id = source index * _ID + block + 1; 0 marks padding (zeros)
MAX_RUNS = 64       # more runs than this: gather in memory instead of one syscall per run


@dataclass(frozen=True)
class Located:
    """A C-contiguous tensor stored in a file."""
    fd: int
    offset: int
    dtype: torch.dtype
    shape: tuple


def _cols(shape) -> int:
    return math.prod(shape[1:]) if len(shape) > 1 else 1


_SCRATCH: dict = {}


def _scratch(slot: str, nbytes: int) -> torch.Tensor:
    """A reused uint8 buffer: fresh multi-100-MB allocations would page-fault (and be
    zeroed by the kernel) every time. Valid until the next request for the same slot, i.e.
    within one mapping step (its plans are written before the next step is planned)."""
    buf = _SCRATCH.get(slot)
    if buf is None or buf.numel() < nbytes:
        buf = _SCRATCH[slot] = torch.empty(nbytes, dtype=torch.uint8)
    return buf[:nbytes]


class _Sources:
    """The sources of one step, each read fully at most once (for gathers)."""

    def __init__(self, sources, block_bytes):
        self.sources, self.block_bytes, self._tables = sources, block_bytes, {}

    def table(self, i: int) -> torch.Tensor:
        if i not in self._tables:
            s = self.sources[i]
            buf = _scratch(f"src{i}", math.prod(s.shape) * s.dtype.itemsize)
            fileio.read_exact(s.fd, s.offset, buf.numpy())
            self._tables[i] = buf.view(-1, self.block_bytes)
        return self._tables[i]


class BlockPlan:
    """The bytes of one output tensor: ``nbytes`` and ``write_to(fd)`` (see module doc)."""

    def __init__(self, ids: torch.Tensor, sources: _Sources):
        self.ids, self.src = ids, sources
        self.nbytes = ids.numel() * sources.block_bytes
        self._segments = None

    def segments(self) -> Optional[list]:
        """The runs as [(fd or None, offset, nbytes)], or None when there are more than
        MAX_RUNS of them."""
        if self._segments is None:
            self._segments = _runs(self.ids, self.src.sources, self.src.block_bytes)
        return self._segments or None

    def write_to(self, fd: int) -> int:
        segs = self.segments()
        if segs is not None or self.nbytes == 0:
            return fileio.write_segments(fd, segs or [])
        which, block = (self.ids - 1) // _ID, (self.ids - 1) % _ID
        out = _scratch("out", self.nbytes).view(-1, self.src.block_bytes)
        if len(self.src.sources) == 1 and bool((self.ids > 0).all()):
            torch.index_select(self.src.table(0), 0, block, out=out)  # one vectorised gather
        else:
            out.zero_()
            for i in range(len(self.src.sources)):
                idx = torch.nonzero(which == i).view(-1)
                if idx.numel():
                    out.index_copy_(0, idx, self.src.table(i).index_select(0, block[idx]))
        return fileio.write_all(fd, out.numpy())


def plan_blocks(fn: Callable, sources: Sequence[Located], out_dtype: torch.dtype) -> Optional[list]:
    """``fn(list of tensors) -> list of tensors`` applied to ``sources``, as one
    (shape, BlockPlan) per output; None when it cannot be done by copying bytes."""
    if not sources or any(s is None or s.dtype != out_dtype for s in sources):
        return None
    try:
        metas = fn([torch.empty(s.shape, dtype=s.dtype, device="meta") for s in sources])
        # block width (elements): the largest that tiles every input and output row
        w = math.gcd(*[_cols(s.shape) for s in sources], *[_cols(m.shape) for m in metas])
        ids = fn([(torch.arange(s.shape[0] * (_cols(s.shape) // w), dtype=torch.int64)
                   + 1 + i * _ID).view(s.shape[0], -1) for i, s in enumerate(sources)])
    except (RuntimeError, IndexError, ValueError):
        return None
    shared = _Sources(list(sources), w * out_dtype.itemsize)
    out = []
    for meta, bid in zip(metas, ids):
        if bid.dim() != 2 or tuple(bid.shape) != (meta.shape[0], _cols(meta.shape) // w):
            return None
        out.append((tuple(meta.shape), BlockPlan(bid.reshape(-1), shared)))
    return out


def _runs(flat: torch.Tensor, sources, block_bytes: int) -> list:
    """Runs of consecutive blocks as segments; [] when empty or more than MAX_RUNS."""
    if flat.numel() == 0:
        return []
    zero = flat == 0
    cont = (flat[1:] == flat[:-1] + 1) & ~zero[1:] & ~zero[:-1]
    cont |= zero[1:] & zero[:-1]
    breaks = torch.nonzero(~cont).view(-1)
    if breaks.numel() >= MAX_RUNS:
        return []
    starts = [0] + (breaks + 1).tolist()
    ends = starts[1:] + [flat.numel()]
    firsts = flat[starts].tolist()
    segs = []
    for a, b, v in zip(starts, ends, firsts):
        n = (b - a) * block_bytes
        if v == 0:
            segs.append((None, 0, n))
        else:
            src, block = divmod(v - 1, _ID)
            s = sources[src]
            segs.append((s.fd, s.offset + block * block_bytes, n))
    return segs
