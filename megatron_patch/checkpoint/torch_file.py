"""torch.save-compatible files written tensor by tensor, and read tensor by tensor.

Why not torch.save / torch.load: torch.save needs the whole object (every tensor) in memory
before it writes, and torch.load(mmap=True) keeps every touched page mapped, so converting
an 8B model at TP=1 would hold ~16 GB. The zip layout torch uses is simple: one
``<archive>/data/<key>`` record per storage (stored, 64-byte aligned) plus a pickle
``<archive>/data.pkl`` that refers to storages by key. The writer below streams the storage
records as tensors arrive and pickles the (small) object at the end; the reader unpickles
only the structure with a restricted unpickler (nothing is executed; unknown classes, e.g.
optimizer or RNG objects, become opaque placeholders) and reads a tensor's bytes on demand.
Files written here load with plain ``torch.load(path, weights_only=True)``.
"""
from __future__ import annotations

import argparse
import collections
import io
import os
import pickle
import struct
import sys
import uuid
import zipfile
import zlib
from typing import Any

import torch

from . import fileio

_PROTOCOL = 2  # torch.serialization.DEFAULT_PROTOCOL
_ALIGN = 64


_STORAGE_DTYPE = {name: dtype for dtype, name in torch.storage._dtype_to_storage_type_map().items()}


def _storage_type(dtype: torch.dtype):
    name = torch.storage._dtype_to_storage_type_map().get(dtype)
    if name is None or dtype in torch.storage._new_dtypes():
        raise TypeError(f"dtype {dtype} is not supported by the streaming checkpoint writer")
    return getattr(torch, name)


class _StorageRef:
    __slots__ = ("key", "dtype", "numel")

    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class StoredTensor:
    """What ``StreamingTorchWriter.add`` returns: put it in the object passed to ``close``;
    it pickles exactly like the tensor torch.save would have written."""
    __slots__ = ("ref", "shape")

    def __init__(self, ref: _StorageRef, shape: tuple):
        self.ref, self.shape = ref, shape

    @property
    def dtype(self):
        return self.ref.dtype

    def __reduce_ex__(self, protocol):
        stride, acc = [], 1
        for s in reversed(self.shape):
            stride.append(acc)
            acc *= s
        return (torch._utils._rebuild_tensor_v2,
                (self.ref, 0, tuple(self.shape), tuple(reversed(stride)), False,
                 collections.OrderedDict()))


class _ZipWriter:
    """The zip container torch.save writes (stored records, data 64-byte aligned, zip64),
    written sequentially so a record's bytes can come from memory or straight from other
    files. Records carry their sizes in the local header (no data descriptors)."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.prefix = os.path.splitext(os.path.basename(path))[0] + "/"
        self.pos = 0
        self.entries = []  # (name bytes, header offset, size, crc)
        self._open = None  # (expected end position) of the record being written

    def begin(self, name: str, size: int, crc: int = 0) -> None:
        """Start a record of ``size`` bytes; the caller then appends exactly that many."""
        if self._open is not None:
            raise RuntimeError("previous record not finished")
        nb = (self.prefix + name).encode()
        zip64 = struct.pack("<HHQQ", 1, 16, size, size)
        fixed = 30 + len(nb) + len(zip64) + 4
        pad = -(self.pos + fixed) % _ALIGN
        extra = zip64 + struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # "FB" padding, as torch
        hdr = struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0x0800, 0, 0, 0x21, crc,
                          0xFFFFFFFF, 0xFFFFFFFF, len(nb), len(extra)) + nb + extra
        self.entries.append((nb, self.pos, size, crc))
        self._write(hdr)
        self._open = self.pos + size

    def end(self) -> None:
        if self.pos != self._open:
            raise RuntimeError(f"record size mismatch: wrote {self.pos}, expected {self._open}")
        self._open = None

    def _write(self, data) -> None:
        self.pos += fileio.write_all(self.fd, data)

    def write(self, data) -> None:
        self._write(data)

    def write_from(self, source) -> None:
        self.pos += source.write_to(self.fd)

    def record(self, name: str, data: bytes) -> None:
        self.begin(name, len(data), zlib.crc32(data))
        self._write(data)
        self.end()

    def close(self) -> None:
        cd_start = self.pos
        for nb, off, size, crc in self.entries:
            extra = struct.pack("<HHQQQ", 1, 24, size, size, off)
            self._write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 0x031E, 45, 0x0800, 0, 0,
                                    0x21, crc, 0xFFFFFFFF, 0xFFFFFFFF, len(nb), len(extra), 0, 0,
                                    0, 0, 0xFFFFFFFF) + nb + extra)
        cd_size, n = self.pos - cd_start, len(self.entries)
        eocd64 = self.pos
        self._write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 45, 0, 0, n, n,
                                cd_size, cd_start))
        self._write(struct.pack("<IIQI", 0x07064B50, 0, eocd64, 1))
        self._write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, min(n, 0xFFFF), min(n, 0xFFFF),
                                min(cd_size, 0xFFFFFFFF), min(cd_start, 0xFFFFFFFF), 0))
        os.close(self.fd)
        self.fd = None


class StreamingTorchWriter:
    """``w = StreamingTorchWriter(path); st = w.add(tensor); ...; w.close({"model": {..: st}})``.

    Each ``add`` writes the tensor's bytes to disk immediately, so the caller can drop it;
    ``add_bytes`` takes the bytes from other files instead.
    Like torch.save with ``compute_crc32=False``, tensor records carry no CRC-32 (computing
    it costs more CPU than the copy; torch.load does not verify it)."""

    def __init__(self, path: str):
        self.path = path
        self._zip = _ZipWriter(path)
        self._count = 0
        self.nbytes = 0

    def _key(self, dtype) -> str:
        _storage_type(dtype)
        key = str(self._count)
        self._count += 1
        return key

    def add(self, tensor: torch.Tensor) -> StoredTensor:
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        key = self._key(t.dtype)
        self._zip.begin(f"data/{key}", t.nbytes)
        if t.nbytes:
            self._zip.write(t.reshape(-1).view(torch.uint8).numpy())
        self._zip.end()
        self.nbytes += t.nbytes
        return StoredTensor(_StorageRef(key, t.dtype, t.numel()), tuple(t.shape))

    def add_bytes(self, dtype: torch.dtype, shape: tuple, source) -> StoredTensor:
        """A C-contiguous tensor whose bytes ``source`` writes: an object with ``nbytes``
        and ``write_to(fd)`` (fileio.Segments, rowcopy.BlockPlan), e.g. copied from other
        files without passing through memory."""
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * dtype.itemsize
        if source.nbytes != nbytes:
            raise ValueError(f"{source.nbytes} bytes given for a {tuple(shape)} {dtype} tensor")
        key = self._key(dtype)
        self._zip.begin(f"data/{key}", nbytes)
        self._zip.write_from(source)
        self._zip.end()
        self.nbytes += nbytes
        return StoredTensor(_StorageRef(key, dtype, numel), tuple(shape))

    def close(self, obj: Any) -> None:
        buf = io.BytesIO()

        class _Pickler(pickle.Pickler):
            def persistent_id(self, o):
                if isinstance(o, _StorageRef):
                    return ("storage", _storage_type(o.dtype), o.key, "cpu", o.numel)
                if isinstance(o, torch.Tensor):
                    raise TypeError("pass tensors through StreamingTorchWriter.add first")
                return None

        _Pickler(buf, protocol=_PROTOCOL).dump(obj)
        z = self._zip
        z.record("data.pkl", buf.getvalue())
        z.record(".format_version", b"1")
        z.record(".storage_alignment", str(_ALIGN).encode())
        z.record("byteorder", sys.byteorder.encode())
        z.record("version", b"3\n")
        z.record(".data/serialization_id", str(uuid.uuid4().int).zfill(40)[:40].encode())
        z.close()
        self._zip = None


# ---- reading ---------------------------------------------------------------------------
class Opaque:
    """Stands for an object of a class the reader does not construct (optimizer/RNG state,
    enums, numpy arrays...). Nothing of it is executed; ``qualname`` says what it was."""
    qualname = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<opaque {self.qualname}>"


class LazyTensor:
    """A tensor in a checkpoint file, read from disk by ``load()`` (nothing is kept)."""
    __slots__ = ("file", "key", "dtype", "offset", "shape", "stride")

    def __init__(self, file, key, dtype, offset, shape, stride):
        self.file, self.key, self.dtype = file, key, dtype
        self.offset, self.shape, self.stride = offset, torch.Size(shape), tuple(stride)

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize

    def load(self) -> torch.Tensor:
        return self.file.read_tensor(self)

    def load_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) along dim 0, reading only their bytes when the tensor is
        C-contiguous (a vocabulary-sized embedding is read a block of rows at a time)."""
        return self.file.read_rows(self, start, stop)

    def __repr__(self):
        return f"LazyTensor({tuple(self.shape)}, {self.dtype})"


def materialize(x):
    """LazyTensor -> tensor; anything else unchanged."""
    return x.load() if isinstance(x, LazyTensor) else x


def rows_of(x, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a LazyTensor (read from disk) or a tensor (a copy)."""
    return x.load_rows(start, stop) if isinstance(x, LazyTensor) else x[start:stop].clone()


_SAFE_GLOBALS = {("collections", "OrderedDict"): collections.OrderedDict,
                 ("argparse", "Namespace"): argparse.Namespace,
                 ("torch", "Size"): torch.Size,
                 ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
                 ("builtins", "slice"): slice, ("builtins", "complex"): complex}


class LazyTorchFile:
    """Open a torch.save zip file without loading tensor data.

    ``LazyTorchFile(path).obj`` is the saved object with every tensor replaced by a
    ``LazyTensor``. Files in the legacy (pre-zip) format are not supported."""

    def __init__(self, path: str):
        self.path = path
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path}: not a torch zip checkpoint (legacy torch.save format?)")
        with zipfile.ZipFile(path) as zf:
            self._infos = {zi.filename: zi for zi in zf.infolist()}
            pkl = [n for n in self._infos if n.endswith("/data.pkl") and n.count("/") == 1]
            if not pkl:
                raise ValueError(f"{path}: no data.pkl record; not a torch checkpoint")
            self._prefix = pkl[0][: -len("data.pkl")]
        self._offsets: dict = {}
        self._fh = None
        fh = self._file()
        fh.seek(self._data_offset("data.pkl", self._infos[pkl[0]]))
        data = fh.read(self._infos[pkl[0]].file_size)
        self.obj = _Unpickler(io.BytesIO(data), self).load()

    # record key -> absolute byte offset of its data in the file
    def _data_offset(self, key: str, zi=None) -> int:
        off = self._offsets.get(key)
        if off is None:
            zi = zi or self._infos[f"{self._prefix}data/{key}"]
            if zi.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"{self.path}: record {key} is compressed")
            fh = self._file()
            fh.seek(zi.header_offset)
            hdr = fh.read(30)
            name_len, extra_len = struct.unpack("<HH", hdr[26:30])
            off = zi.header_offset + 30 + name_len + extra_len
            self._offsets[key] = off
        return off

    def _file(self):
        if self._fh is None:
            self._fh = open(self.path, "rb", buffering=0)
        return self._fh

    def location(self, lt: LazyTensor):
        """(fd, byte offset) of a C-contiguous lazy tensor's data, or None if strided."""
        if tuple(lt.stride) != tuple(torch.empty(lt.shape, device="meta").stride()):
            return None
        return self._file().fileno(), self._data_offset(lt.key) + lt.offset * lt.dtype.itemsize

    def read_tensor(self, lt: LazyTensor) -> torch.Tensor:
        item = lt.dtype.itemsize
        if lt.shape.numel() == 0:
            return torch.empty(lt.shape, dtype=lt.dtype)
        span = 1 + sum((s - 1) * st for s, st in zip(lt.shape, lt.stride))
        buf = torch.empty(span * item, dtype=torch.uint8)
        fh = self._file()
        fh.seek(self._data_offset(lt.key) + lt.offset * item)
        view, got = memoryview(buf.numpy()), 0
        while got < len(view):  # readinto may return short counts on large reads
            n = fh.readinto(view[got:])
            if not n:
                raise IOError(f"{self.path}: truncated record {lt.key}")
            got += n
        t = buf.view(lt.dtype)
        if tuple(lt.stride) != tuple(torch.empty(lt.shape).stride()):
            t = t.as_strided(lt.shape, lt.stride).contiguous()
        return t.view(lt.shape)

    def read_rows(self, lt: LazyTensor, start: int, stop: int) -> torch.Tensor:
        start, stop = max(0, start), min(stop, lt.shape[0])
        contiguous = tuple(lt.stride) == tuple(torch.empty(lt.shape, device="meta").stride())
        if not contiguous or lt.shape.numel() == 0:
            return self.read_tensor(lt)[start:stop].clone()
        shape = (max(0, stop - start),) + tuple(lt.shape[1:])
        stride = torch.empty(shape, device="meta").stride()
        offset = lt.offset + start * lt.shape[1:].numel()
        return self.read_tensor(LazyTensor(self, lt.key, lt.dtype, offset, shape, stride))

    def close(self):
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Unpickler(pickle.Unpickler):
    def __init__(self, f, owner: LazyTorchFile):
        super().__init__(f)
        self._owner = owner

    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor_v3"):
            return self._rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, requires_grad, hooks: data
        if module == "torch._utils" and name == "_rebuild_parameter_with_state":
            return lambda data, requires_grad, hooks, state: data
        if module == "torch" and name.endswith("Storage"):
            return getattr(torch, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return type(name, (Opaque,), {"qualname": f"{module}.{name}"})

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")
        dtype = _STORAGE_DTYPE.get(getattr(storage_type, "__name__", ""), torch.uint8)
        return _StorageRef(key, dtype, numel)

    def _rebuild_tensor(self, storage, offset, size, stride, requires_grad=False, hooks=None,
                        *rest):
        dtype = storage.dtype
        if rest and isinstance(rest[0], torch.dtype):  # _rebuild_tensor_v3: untyped storage
            dtype = rest[0]
        return LazyTensor(self._owner, storage.key, dtype, offset, size, stride)
