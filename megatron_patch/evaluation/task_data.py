"""Offline loaders for MMLU, CMMLU and C-Eval in their official file layouts, and for the
bundled tiny task (its data ships in the package, assets/mp_tiny_mmlu). Used by the task
YAMLs of LM-Evaluation-Harness/tasks (``custom_dataset: !function utils.load``, each
folder's utils.py re-exports ``load``) and by the preflight check. No network, no torch:
the ``--model hf`` path stays light.

Where the data lives (first match wins):
  1. ``--metadata mmlu_dir=/path`` (lm-eval passes metadata and model_args to the loader)
  2. environment ``MMLU_DIR`` / ``CMMLU_DIR`` / ``CEVAL_DIR``
  3. ``EVAL_DATA_DIR`` holding ``mmlu/``, ``cmmlu/``, ``ceval/`` sub-folders

Official layouts (the folder you point at may also be the parent of MMLU's ``data/``):
  MMLU  (Hendrycks data.tar):  data/{dev,val,test}/<subject>_{dev,val,test}.csv, no header,
                               columns question,A,B,C,D,answer
  CMMLU (cmmlu_v1_0_1.zip):    {dev,test}/<subject>.csv, header ",Question,A,B,C,D,Answer"
  C-Eval (ceval-exam.zip):     {dev,val,test}/<subject>_{dev,val,test}.csv, header
                               "id,question,A,B,C,D,answer[,explanation]"
Every benchmark is returned in one schema: question, A, B, C, D, answer (a letter).
"""
from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass

BUNDLED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "mp_tiny_mmlu")
LETTERS = ("A", "B", "C", "D")


OUR_TASK_PREFIXES = ("mmlu_local", "cmmlu_local", "ceval_local-valid", "mp_tiny_mmlu")


class _QuietCustomDataset(logging.Filter):
    """lm-eval warns once per task that loads through ``custom_dataset`` ("Custom kwargs can
    be passed to --metadata..."): 57 lines for MMLU saying nothing about our tasks, whose
    data keys are documented here. Drop that one message for our tasks only."""

    def filter(self, record):
        msg = record.getMessage()
        return not ("Custom kwargs can be passed to `--metadata`" in msg
                    and msg.split(":", 1)[0].startswith(OUR_TASK_PREFIXES))


if not any(isinstance(f, _QuietCustomDataset) or type(f).__name__ == "_QuietCustomDataset"
           for f in logging.getLogger("lm_eval.api.task").filters):
    logging.getLogger("lm_eval.api.task").addFilter(_QuietCustomDataset())


class TaskDataError(FileNotFoundError):
    """Task data missing or malformed; the message says what and where."""


@dataclass(frozen=True)
class Layout:
    name: str              # display name
    key: str               # metadata key / env prefix
    splits: dict           # lm-eval split -> path pattern relative to the data root
    header: bool
    columns: tuple         # header names (question, A, B, C, D, answer) when header=True
    probe: str             # a sub-folder that identifies the root


LAYOUTS = {
    "mmlu": Layout("MMLU", "mmlu", {"dev": "dev/{s}_dev.csv", "validation": "val/{s}_val.csv",
                                     "test": "test/{s}_test.csv"},
                   header=False, columns=(), probe="test"),
    "cmmlu": Layout("CMMLU", "cmmlu", {"dev": "dev/{s}.csv", "test": "test/{s}.csv"},
                    header=True, columns=("Question", "A", "B", "C", "D", "Answer"), probe="test"),
    "ceval": Layout("C-Eval", "ceval", {"dev": "dev/{s}_dev.csv", "validation": "val/{s}_val.csv",
                                        "test": "test/{s}_test.csv"},
                    header=True, columns=("question", "A", "B", "C", "D", "answer"), probe="val"),
}
LAYOUT_HELP = {
    "mmlu": "data/{dev,val,test}/<subject>_{dev,val,test}.csv (MMLU's data.tar)",
    "cmmlu": "{dev,test}/<subject>.csv (CMMLU's cmmlu_v1_0_1.zip)",
    "ceval": "{dev,val,test}/<subject>_{dev,val,test}.csv (C-Eval's ceval-exam.zip)",
}


def data_root(benchmark: str, metadata: dict | None = None) -> str:
    """The folder holding ``benchmark``'s files, or TaskDataError saying how to give it."""
    if benchmark == "bundled":
        return BUNDLED_DIR
    lay = LAYOUTS[benchmark]
    metadata = metadata or {}
    env = lay.key.upper() + "_DIR"
    root, origin = None, None
    if metadata.get(lay.key + "_dir"):
        root, origin = str(metadata[lay.key + "_dir"]), f"--metadata {lay.key}_dir"
    elif os.environ.get(env):
        root, origin = os.environ[env], env
    elif os.environ.get("EVAL_DATA_DIR"):
        root, origin = os.path.join(os.environ["EVAL_DATA_DIR"], lay.key), "EVAL_DATA_DIR"
    if root is None:
        raise TaskDataError(
            f"{lay.name} data folder not given: set {env}=/path/to/{lay.key} (or EVAL_DATA_DIR="
            f"/path holding {lay.key}/, or --metadata {lay.key}_dir=/path); expected layout "
            f"{LAYOUT_HELP[benchmark]}")
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise TaskDataError(f"{lay.name} data folder {root} (from {origin}) does not exist; "
                            f"expected layout {LAYOUT_HELP[benchmark]}")
    # MMLU's archive unpacks to data/; accept the parent too.
    if not os.path.isdir(os.path.join(root, lay.probe)) and \
            os.path.isdir(os.path.join(root, "data", lay.probe)):
        root = os.path.join(root, "data")
    return root


def split_path(benchmark: str, subject: str, split: str, metadata: dict | None = None) -> str:
    lay = LAYOUTS["mmlu" if benchmark == "bundled" else benchmark]
    return os.path.join(data_root(benchmark, metadata), lay.splits[split].format(s=subject))


def read_split(benchmark: str, subject: str, split: str, metadata: dict | None = None) -> list:
    """Rows of one split as dicts {question, A, B, C, D, answer}."""
    lay = LAYOUTS["mmlu" if benchmark == "bundled" else benchmark]
    path = split_path(benchmark, subject, split, metadata)
    name = "bundled task" if benchmark == "bundled" else lay.name
    if not os.path.isfile(path):
        raise TaskDataError(f"{name} data missing: {path} not found (subject {subject!r}, split "
                            f"{split!r}); expected layout "
                            f"{LAYOUT_HELP['mmlu' if benchmark == 'bundled' else benchmark]}")
    rows = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        if lay.header:
            head = next(reader, None) or []
            try:
                idx = [head.index(c) for c in lay.columns]
            except ValueError:
                raise TaskDataError(f"{path}: header {head} lacks the {lay.name} columns "
                                    f"{list(lay.columns)}") from None
        else:
            idx = list(range(6))
        for n, rec in enumerate(reader, start=2 if lay.header else 1):
            if not rec:
                continue
            if len(rec) <= max(idx):
                raise TaskDataError(f"{path}:{n}: expected question,A,B,C,D,answer; got "
                                    f"{len(rec)} fields")
            q, a, b, c, d, ans = (rec[i] for i in idx)
            ans = ans.strip().upper()
            if split != "test" or benchmark != "ceval":  # C-Eval hides test answers
                if ans not in LETTERS:
                    raise TaskDataError(f"{path}:{n}: answer {ans!r} is not one of A, B, C, D")
            rows.append({"question": q, "A": a, "B": b, "C": c, "D": d, "answer": ans})
    if not rows:
        raise TaskDataError(f"{path} has no questions")
    return rows


def load(benchmark: str = "mmlu", subject: str = "", splits=None, **metadata):
    """lm-eval ``custom_dataset`` hook: a DatasetDict of the splits this task uses."""
    import datasets

    splits = splits or list(LAYOUTS["mmlu" if benchmark == "bundled" else benchmark].splits)
    return datasets.DatasetDict({
        split: datasets.Dataset.from_list(read_split(benchmark, subject, split, metadata))
        for split in splits})


def check(benchmark: str, subjects, splits, metadata: dict | None = None) -> int:
    """Preflight: every needed file exists. Returns the number of files checked."""
    paths = [split_path(benchmark, s, split, metadata) for s in subjects for split in splits]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        lay = "mmlu" if benchmark == "bundled" else benchmark
        name = "bundled task" if benchmark == "bundled" else LAYOUTS[lay].name
        more = f" (and {len(missing) - 1} more of the {len(paths)} files needed)" \
            if len(missing) > 1 else ""
        raise TaskDataError(f"{name} data missing: {missing[0]} not found{more}; expected "
                            f"layout {LAYOUT_HELP[lay]}")
    return len(paths)
