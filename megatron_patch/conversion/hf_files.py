"""HF checkpoint files: a tensor-by-tensor reader and a streaming sharded safetensors writer.

Reader: ``model.safetensors`` / sharded ``*.safetensors`` (+ index), or ``pytorch_model*.bin``
loaded only with ``weights_only=True``. Shapes and dtypes come from the safetensors headers
(no tensor is read to validate a checkpoint); each ``read`` opens the file with
``safe_open`` and closes it again, so pages of the memory map are released after each group
of tensors instead of accumulating in the process's resident set.

Writer: the names and shapes of an exported model are known before any tensor is produced,
so shard boundaries and safetensors headers are fixed up front and each tensor's bytes are
appended the moment it is ready: memory holds one tensor, not one shard.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from typing import Optional, Sequence

import torch

from megatron_patch.checkpoint import fileio
from megatron_patch.checkpoint.hf_layout import (read_safetensors_header,  # noqa: F401
                                                 read_weight_map, safetensors_problem)

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
             "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
             "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}

# files copied next to a converted checkpoint (and back) so later steps find the tokenizer
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer.model",
              "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
              "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")


class HFCheckpoint:
    """The weights of a HF Llama checkpoint directory, read tensor by tensor."""

    def __init__(self, path: str):
        self.path = path
        self.files: dict = {}   # tensor name -> file
        self.meta: dict = {}    # tensor name -> (dtype, shape)
        self.offsets: dict = {}  # tensor name -> absolute byte offset (safetensors)
        self._fds: dict = {}
        self._bin_cache = (None, None)  # one .bin file's (mmap) state dict at a time
        self.format = self._discover()

    def _discover(self) -> str:
        p = self.path
        if not os.path.isdir(p):
            raise FileNotFoundError(f"{p}: no such directory")
        names = sorted(os.listdir(p))
        for index_name, fmt in (("model.safetensors.index.json", "safetensors"),
                                ("pytorch_model.bin.index.json", "bin")):
            if index_name in names:
                weight_map = read_weight_map(os.path.join(p, index_name))
                for file in sorted(set(weight_map.values())):
                    if not os.path.isfile(os.path.join(p, file)):
                        raise FileNotFoundError(f"{p}: {index_name} lists {file}, which is missing")
                if fmt == "safetensors":
                    for file in sorted(set(weight_map.values())):
                        self._add_safetensors(os.path.join(p, file))
                else:
                    self.files = {k: os.path.join(p, v) for k, v in weight_map.items()}
                return fmt
        st = [n for n in names if n.endswith(".safetensors")]
        if st:
            for n in st:
                self._add_safetensors(os.path.join(p, n))
            return "safetensors"
        bins = [n for n in names if n.startswith("pytorch_model") and n.endswith(".bin")]
        if bins:
            for n in bins:
                sd = self._load_bin(os.path.join(p, n))
                self.files.update({k: os.path.join(p, n) for k in sd})
            return "bin"
        if any(n.startswith("consolidated.") for n in names):
            raise FileNotFoundError(f"{p}: consolidated.*.pth files but no params.json; a Meta "
                                    f"checkpoint folder is read with its params.json")
        raise FileNotFoundError(f"{p}: no model weights (*.safetensors or pytorch_model*.bin)")

    def _add_safetensors(self, file: str) -> None:
        why = safetensors_problem(file)  # a cut file: refused before anything is written
        if why:
            raise ValueError(why)
        header = read_safetensors_header(file)
        base = 8 + header.pop("__header_len__")
        for name, info in header.items():
            self.files[name] = file
            self.meta[name] = (ST_DTYPES.get(info["dtype"]), tuple(info["shape"]))
            self.offsets[name] = base + info["data_offsets"][0]

    def locate(self, name: str):
        """Where a tensor's bytes are (rowcopy.Located), or None (.bin files)."""
        from .rowcopy import Located
        if name not in self.offsets or self.meta[name][0] is None:
            return None
        file = self.files[name]
        if file not in self._fds:
            self._fds[file] = os.open(file, os.O_RDONLY)
        dtype, shape = self.meta[name]
        return Located(self._fds[file], self.offsets[name], dtype, shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._bin_cache = (None, None)

    def _load_bin(self, file: str) -> dict:
        if self._bin_cache[0] != file:
            sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            self._bin_cache = (file, sd)
            for k, v in sd.items():
                self.meta[k] = (v.dtype, tuple(v.shape))
        return self._bin_cache[1]

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def shape(self, name: str) -> tuple:
        if name not in self.meta:
            self._load_bin(self.files[name])
        return self.meta[name][1]

    def dtype(self, name: str) -> torch.dtype:
        if name not in self.meta:
            self._load_bin(self.files[name])
        return self.meta[name][0]

    def nbytes(self, name: str) -> int:
        n = 1
        for s in self.shape(name):
            n *= s
        return n * self.dtype(name).itemsize

    def read(self, names: Sequence[str]) -> list:
        """Tensors for ``names`` (in order), each owning its memory."""
        out = {}
        by_file: dict = {}
        for n in names:
            if n not in self.files:
                raise KeyError(f"{self.path}: tensor {n} not found")
            by_file.setdefault(self.files[n], []).append(n)
        for file, group in by_file.items():
            if self.format == "safetensors":
                from safetensors import safe_open
                with safe_open(file, framework="pt", device="cpu") as f:
                    for n in group:
                        out[n] = f.get_tensor(n)
            else:
                sd = self._load_bin(file)
                for n in group:
                    out[n] = sd[n].clone()
        return [out[n] for n in names]

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of tensor ``name`` (safetensors: only those rows are read)."""
        if name not in self.files:
            raise KeyError(f"{self.path}: tensor {name} not found")
        if self.format == "safetensors":
            from safetensors import safe_open
            with safe_open(self.files[name], framework="pt", device="cpu") as f:
                return f.get_slice(name)[start:stop]
        return self._load_bin(self.files[name])[name][start:stop].clone()


class SafetensorsStreamWriter:
    """Writes ``plan`` = [(name, shape)] as sharded safetensors files + index, in order.

    ``write(name, tensor)`` must follow the plan order; a shard file is complete (and
    closed) as soon as its last tensor is written."""

    def __init__(self, out_dir: str, plan: Sequence[tuple], dtype: torch.dtype,
                 max_shard_bytes: int = 2 * 2**30):
        self.out_dir, self.dtype = out_dir, dtype
        item = dtype.itemsize
        shards, cur, cur_bytes = [], [], 0
        for name, shape in plan:
            nb = item
            for s in shape:
                nb *= s
            if cur and cur_bytes + nb > max_shard_bytes:
                shards.append(cur)
                cur, cur_bytes = [], 0
            cur.append((name, tuple(shape), nb))
            cur_bytes += nb
        if cur:
            shards.append(cur)
        n = len(shards)
        self.shards = [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", s) for i, s in enumerate(shards)]
        self.total_size = sum(nb for _, s in self.shards for *_, nb in s)
        self._order = [(fi, name, shape) for fi, (_, s) in enumerate(self.shards)
                       for name, shape, _ in s]
        self._pos = 0
        self._fh = None
        self._fi = -1
        os.makedirs(out_dir, exist_ok=True)

    def _open_shard(self, fi: int) -> None:
        fname, tensors = self.shards[fi]
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, nb in tensors:
            header[name] = {"dtype": ST_NAMES[self.dtype], "shape": list(shape),
                            "data_offsets": [off, off + nb]}
            off += nb
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self._fh = open(os.path.join(self.out_dir, fname), "wb", buffering=0)
        fileio.write_all(self._fh.fileno(), struct.pack("<Q", len(raw)) + raw)
        self._fi = fi

    byte_copy = True  # accepts write_bytes

    def _next(self, name: str, shape: tuple) -> None:
        if self._pos >= len(self._order):
            raise ValueError(f"unexpected tensor {name}: every planned tensor was written")
        fi, want, want_shape = self._order[self._pos]
        if name != want or tuple(shape) != want_shape:
            raise ValueError(f"expected {want} {want_shape}, got {name} {tuple(shape)}")
        if fi != self._fi:
            self._close_file()
            self._open_shard(fi)

    def _done(self) -> None:
        fi = self._order[self._pos][0]
        self._pos += 1
        if self._pos == len(self._order) or self._order[self._pos][0] != fi:
            self._close_file()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._next(name, tuple(tensor.shape))
        t = tensor.detach().to("cpu", self.dtype).contiguous()
        fileio.write_all(self._fh.fileno(), t.reshape(-1).view(torch.uint8).numpy())
        self._done()

    def write_bytes(self, name: str, shape: tuple, source) -> None:
        """The tensor's bytes (already in self.dtype) come from ``source`` (``nbytes`` +
        ``write_to(fd)``: fileio.Segments, rowcopy.BlockPlan)."""
        self._next(name, tuple(shape))
        fileio_written = source.write_to(self._fh.fileno())
        if fileio_written != source.nbytes:
            raise IOError(f"{name}: wrote {fileio_written} of {source.nbytes} bytes")
        self._done()

    def _close_file(self):
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def close(self) -> list:
        """Write the index; returns the shard file names."""
        self._close_file()
        if self._pos != len(self._order):
            raise ValueError(f"only {self._pos} of {len(self._order)} planned tensors written")
        weight_map = {name: fname for fname, s in self.shards for name, _, _ in s}
        with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": self.total_size}, "weight_map": weight_map},
                      f, indent=2)
        return [fname for fname, _ in self.shards]


def copy_side_files(src: Optional[str], dst: str, names: Sequence[str] = SIDE_FILES) -> list:
    """Copy tokenizer/generation files that exist in ``src`` into ``dst``."""
    copied = []
    if not src or not os.path.isdir(src):
        return copied
    for n in names:
        p = os.path.join(src, n)
        if os.path.isfile(p):
            shutil.copy2(p, os.path.join(dst, n))
            copied.append(n)
    return copied
