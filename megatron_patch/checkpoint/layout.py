"""Names and discovery of the Megatron checkpoint layout (docs/checkpoint-layout.md).

    <root>/latest_checkpointed_iteration.txt          "release" or N
    <root>/release | iter_%07d/
        mp_rank_%02d/model_optim_rng.pt               PP == 1 (TP rank)
        mp_rank_%02d_%03d/model_optim_rng.pt          PP > 1  (TP rank, PP rank)

These are the names Megatron-LM and Pai-Megatron-Patch read and write, so their tools find
our checkpoints and we find theirs. An iteration directory may instead hold a checkpoint in
megatron-core's torch_dist format (dist_format.py; Megatron-LM's --ckpt-format torch_dist),
recognised here by its metadata.json. Standard library only.
"""
from __future__ import annotations

import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from typing import Optional, Union

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
CHECKPOINT_FILENAME = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0

Iteration = Union[int, str]  # an int, or "release"

# megatron-core's torch_dist iteration directory: these files, metadata.json written last
DIST_FORMAT = "torch_dist"
DIST_FILES = ("metadata.json", ".metadata", "common.pt")

_ITER_RE = re.compile(r"^iter_(\d{7,})$")
_RANK_RE = re.compile(r"^mp_rank_(\d{2,})(?:_(\d{3,}))?$")


def iteration_dirname(iteration: Iteration) -> str:
    if iteration == "release":
        return "release"
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise ValueError(f"iteration must be 'release' or an int >= 0, not {iteration!r}")
    return f"iter_{iteration:07d}"


def rank_dirname(tp_rank: int, pp_rank: int = 0, pp_size: int = 1) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def checkpoint_file(iter_dir: str, tp_rank: int, pp_rank: int = 0, pp_size: int = 1) -> str:
    """Path of one rank's file inside an iteration directory (release/ or iter_N/)."""
    return os.path.join(iter_dir, rank_dirname(tp_rank, pp_rank, pp_size), CHECKPOINT_FILENAME)


def read_tracker(root: str) -> Optional[Iteration]:
    """The iteration named by the tracker file, or None when there is none."""
    path = os.path.join(root, TRACKER_FILENAME)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if text == "release":
        return "release"
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{path}: expected 'release' or an iteration number, found {text!r}")


def write_tracker(root: str, iteration: Iteration) -> None:
    """Atomically point the tracker at ``iteration`` (temp file + rename)."""
    iteration_dirname(iteration)  # validates
    path = os.path.join(root, TRACKER_FILENAME)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_dist_checkpoint(iter_dir: str) -> bool:
    """An iteration directory written by megatron-core's torch_dist strategy."""
    try:
        with open(os.path.join(iter_dir, DIST_FILES[0])) as f:
            return json.load(f).get("sharded_backend") == DIST_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


@dataclass
class CheckpointDir:
    """One iteration directory and the rank files found in it. A torch_dist checkpoint has
    no rank files and holds every tensor whole: it reads as one TP=1 PP=1 model."""
    root: str
    iteration: Iteration
    path: str
    tp: int
    pp: int
    files: dict = field(repr=False)  # (tp_rank, pp_rank) -> file path
    # newer checkpoints passed over while finding this one: [(iteration, why)]
    skipped: list = field(default_factory=list, repr=False)
    format: str = "torch"  # "torch" (per-rank files) | "torch_dist"

    @property
    def complete(self) -> bool:
        if self.format == DIST_FORMAT:
            return all(os.path.isfile(os.path.join(self.path, n)) for n in DIST_FILES)
        return all((t, p) in self.files for t in range(self.tp) for p in range(self.pp))

    def file(self, tp_rank: int, pp_rank: int = 0) -> str:
        if self.format == DIST_FORMAT:
            raise FileNotFoundError(f"{self.path}: a torch_dist checkpoint has no per-rank "
                                    f"files; read it with checkpoint.load.open_source")
        try:
            return self.files[(tp_rank, pp_rank)]
        except KeyError:
            raise FileNotFoundError(f"{self.path}: no file for TP rank {tp_rank}, PP rank "
                                    f"{pp_rank} (layout TP={self.tp} PP={self.pp})") from None


def scan_iteration_dir(path: str, root: Optional[str] = None,
                       iteration: Optional[Iteration] = None) -> CheckpointDir:
    """Find the rank files of one iteration directory; TP/PP come from the directory names."""
    if iteration is None:
        base = os.path.basename(os.path.normpath(path))
        m = _ITER_RE.match(base)
        iteration = int(m.group(1)) if m else "release"
    root = root or os.path.dirname(os.path.normpath(path))
    if is_dist_checkpoint(path):
        return CheckpointDir(root, iteration, path, 1, 1, {}, format=DIST_FORMAT)
    files = {}
    two_level = False
    if os.path.isdir(path):
        for name in os.listdir(path):
            m = _RANK_RE.match(name)
            f = os.path.join(path, name, CHECKPOINT_FILENAME)
            if m and os.path.isfile(f):
                files[(int(m.group(1)), int(m.group(2) or 0))] = f
                two_level |= m.group(2) is not None
    if not files:
        raise FileNotFoundError(f"{path}: no mp_rank_*/{CHECKPOINT_FILENAME} files")
    tp = 1 + max(t for t, _ in files)
    pp = 1 + max(p for _, p in files)
    return CheckpointDir(root, iteration, path, tp, pp if two_level else 1, files)


def torch_file_problem(path: str):
    """None when ``path`` looks like a whole torch.save file (its zip directory reads and
    every member lies inside the file), else a short reason. Cheap: reads the directory at
    the end of the file only; a file cut by a crash or a full disk fails here."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty file"
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.header_offset + info.compress_size > size:
                    return "truncated"
    except zipfile.BadZipFile:
        return "truncated or not a torch file"
    except OSError as e:
        return e.strerror or str(e)
    return None


def checkpoint_problem(ckpt: CheckpointDir):
    """Why the checkpoint cannot be read (missing or damaged rank files), or None."""
    if ckpt.format == DIST_FORMAT:
        missing = [n for n in DIST_FILES if not os.path.isfile(os.path.join(ckpt.path, n))]
        return f"incomplete torch_dist checkpoint (no {', '.join(missing)})" if missing else None
    if not ckpt.complete:
        return f"incomplete ({len(ckpt.files)} of {ckpt.tp * ckpt.pp} rank files)"
    for key in sorted(ckpt.files):
        rank_dir = os.path.dirname(ckpt.files[key])
        for name in sorted(os.listdir(rank_dir)):
            if name.endswith(".pt"):
                why = torch_file_problem(os.path.join(rank_dir, name))
                if why:
                    return f"{os.path.join(os.path.basename(rank_dir), name)}: {why}"
    return None


def list_iterations(root: str) -> list:
    """Iterations present under root (complete or not), oldest first, 'release' first."""
    found = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            m = _ITER_RE.match(name)
            if m and os.path.isdir(os.path.join(root, name)):
                found.append(int(m.group(1)))
    out = sorted(found)
    if os.path.isdir(os.path.join(root, "release")):
        out.insert(0, "release")
    return out


def find_checkpoint(path: str, iteration: Optional[Iteration] = None) -> CheckpointDir:
    """The checkpoint to read from ``path``: a root directory (tracker + iteration dirs) or
    an iteration directory itself. With ``iteration=None`` the tracker's iteration when it is
    complete and readable, else the newest one that is (a crash can leave a tracker pointing
    to nothing, or a cut file); the ones passed over are listed in ``.skipped``.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    if any(_RANK_RE.match(n) for n in os.listdir(path)) or is_dist_checkpoint(path):
        ckpt = scan_iteration_dir(path)  # an iteration directory
        why = checkpoint_problem(ckpt)
        if why:
            raise FileNotFoundError(f"{path}: cannot be read: {why}")
        return ckpt
    if iteration is not None:
        ckpt = scan_iteration_dir(os.path.join(path, iteration_dirname(iteration)), path,
                                  iteration)
        why = checkpoint_problem(ckpt)
        if why:
            raise FileNotFoundError(f"{ckpt.path}: cannot be read: {why}")
        return ckpt
    candidates = list_iterations(path)
    skipped = []
    try:
        tracked = read_tracker(path)
    except ValueError as e:
        tracked = None
        skipped.append((None, str(e)))
    if tracked in candidates:  # try the tracked one first
        candidates.remove(tracked)
        candidates.append(tracked)
    for it in reversed(candidates):
        try:
            ckpt = scan_iteration_dir(os.path.join(path, iteration_dirname(it)), path, it)
        except FileNotFoundError:
            skipped.append((it, "no rank files"))
            continue
        why = checkpoint_problem(ckpt)
        if why is None:
            ckpt.skipped = skipped
            return ckpt
        skipped.append((it, why))
    reasons = "; ".join(f"{iteration_dirname(it) if it is not None else 'tracker'}: {why}"
                        for it, why in skipped)
    raise FileNotFoundError(f"{path}: no complete Megatron checkpoint (expected "
                            f"{TRACKER_FILENAME} and release/ or iter_NNNNNNN/ with "
                            f"mp_rank_*/{CHECKPOINT_FILENAME} or a torch_dist checkpoint)"
                            + (f"; {reasons}" if reasons else ""))
