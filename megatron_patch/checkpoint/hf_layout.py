"""The weight files of an HF model folder, checked without torch (standard library only).

A ``*.safetensors`` file is an 8-byte header length, a JSON header giving each tensor's
byte range, then the data: a file cut by a crash, a full disk or an interrupted download
is shorter than its header says, which is found here by comparing sizes (no tensor is
read). The converter checks this before writing anything; evaluation's preflight too.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Optional

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
MAX_HEADER = 100 * 2**20


def read_safetensors_header(path: str) -> dict:
    """{name: {dtype, shape, data_offsets}} plus "__header_len__" (data starts at 8 + it);
    ValueError naming the file when it is not a safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER:
            raise ValueError(f"{path}: not a safetensors file (header length {n})")
        text = f.read(n)
    try:
        header = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{path}: not a safetensors file, or cut inside its header") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    header["__header_len__"] = n
    return header


def safetensors_end(header: dict) -> int:
    """The file size the header implies (8 + header + the furthest tensor's end)."""
    ends = [info["data_offsets"][1] for k, info in header.items() if k != "__header_len__"]
    return 8 + header["__header_len__"] + max(ends, default=0)


def safetensors_problem(path: str) -> Optional[str]:
    """None when the file is as long as its header says, else a one-line reason naming it."""
    try:
        header = read_safetensors_header(path)
        want, have = safetensors_end(header), os.path.getsize(path)
    except ValueError as e:
        return str(e)
    except (KeyError, IndexError, TypeError):
        return f"{path}: not a safetensors file (malformed header)"
    except OSError as e:
        return f"{path}: cannot read ({e.strerror or e})"
    if have < want:
        return (f"{path}: truncated ({have} of {want} bytes; an interrupted copy or download?"
                " copy the file again)")
    return None


def read_weight_map(index_path: str) -> dict:
    """The {tensor: file} map of a sharded checkpoint's index; ValueError naming the file."""
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except ValueError as e:
        raise ValueError(f"{index_path}: not valid JSON ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path}: no \"weight_map\" of tensor names to files")
    return weight_map


def hf_weights_problem(folder: str) -> Optional[str]:
    """None when the folder's weight files look whole (index readable, listed files present,
    every safetensors file as long as its header says), else one line naming the file."""
    names = set(os.listdir(folder))
    files = sorted(n for n in names if n.endswith(".safetensors"))
    for index_name in INDEX_FILES:
        if index_name in names:
            try:
                listed = sorted(set(read_weight_map(os.path.join(folder, index_name)).values()))
            except ValueError as e:
                return str(e)
            missing = [f for f in listed if f not in names]
            if missing:
                return f"{folder}: {index_name} lists {missing[0]}, which is missing"
            files = [f for f in listed if f.endswith(".safetensors")]
            break
    for name in files:
        why = safetensors_problem(os.path.join(folder, name))
        if why:
            return why
    return None
