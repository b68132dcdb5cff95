"""Checks run before an evaluation starts, so the three common mistakes end in one clear line
instead of a traceback minutes later (under accelerate, from every process):

- a wrong model / checkpoint path,
- an unknown task name,
- missing task data for the offline MMLU / CMMLU / C-Eval tasks of tasks/.

    python -m megatron_patch.evaluation.preflight --model hf --model_args pretrained=DIR \
        --tasks mmlu_local --include_path LM-Evaluation-Harness/tasks

Exit status 0 when everything is in place, 2 with ``error: ...`` on stderr otherwise.
Kept free of torch / megatron imports so it answers in about a second.
"""
from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import os
import re
import sys

from megatron_patch.checkpoint.hf_layout import hf_weights_problem
from megatron_patch.checkpoint.layout import find_checkpoint

from . import task_data
from .task_catalog import task_table

HARNESS_TASKS = "LM-Evaluation-Harness/tasks"  # where this project's task YAMLs live


class PreflightError(ValueError):
    pass


# ---- argument parsing (the subset of lm-eval's CLI that matters here) ------------------------
def parse_kv(text) -> dict:
    """'a=1,b=x' or ['a=1', 'b=x'] -> dict of strings (lm-eval's model_args syntax)."""
    if not text:
        return {}
    parts = text if isinstance(text, list) else [text]
    out = {}
    for part in parts:
        for item in str(part).split(","):
            if item.strip():
                k, _, v = item.partition("=")
                out[k.strip()] = v.strip()
    return out


def split_tasks(tasks) -> list:
    parts = tasks if isinstance(tasks, list) else [tasks]
    return [t.strip() for p in parts if p for t in str(p).split(",") if t.strip()]


# ---- model -----------------------------------------------------------------------------
_MP_DIR = re.compile(r"^mp_rank_\d{2}(_\d{3})?$")


def check_model(model: str, model_args: dict) -> None:
    if model in ("hf", "hf-auto", "huggingface"):
        path = model_args.get("pretrained")
        if not path:
            raise PreflightError("--model hf needs --model_args pretrained=<HF model directory>")
        looks_local = os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path)
        if looks_local:
            p = os.path.expanduser(path)
            if not os.path.isdir(p):
                raise PreflightError(f"model directory not found: {path}")
            if not os.path.isfile(os.path.join(p, "config.json")):
                raise PreflightError(f"{path} is not an HF model directory (no config.json); "
                                     "for a Megatron checkpoint use --model megatron_patch "
                                     "--model_args load=<dir>, or convert it with mg2hf=true")
            cfg = os.path.join(p, "config.json")
            try:  # any architecture lm-eval's hf model takes: only its JSON is checked
                with open(cfg, encoding="utf-8") as f:
                    json.load(f)
            except ValueError as e:
                raise PreflightError(f"{cfg}: not valid JSON ({e})") from None
            why = hf_weights_problem(p)
            if why:
                raise PreflightError(why)
    elif model == "megatron_patch":
        load = model_args.get("load")
        if not load:
            raise PreflightError("--model megatron_patch needs --model_args load=<Megatron "
                                 "checkpoint directory>")
        p = os.path.expanduser(load)
        if not os.path.isdir(p):
            raise PreflightError(f"checkpoint directory not found: {load}")
        names = os.listdir(p)
        if "latest_checkpointed_iteration.txt" not in names and \
                not any(_MP_DIR.match(n) for n in names):
            hint = (" (it is an HF model directory: use --model hf --model_args pretrained="
                    f"{load})") if "config.json" in names and any(
                n.endswith((".safetensors", ".bin")) for n in names) else ""
            raise PreflightError(f"{load} is not a Megatron checkpoint: no "
                                 f"latest_checkpointed_iteration.txt and no mp_rank_* "
                                 f"folders{hint}")
        try:  # every rank file whole (a cut file: one line here, not a traceback per rank)
            find_checkpoint(p)
        except (FileNotFoundError, ValueError) as e:
            raise PreflightError(f"load={load}: {str(e).replace(f'{p}: ', '', 1)}") from None
        tok = model_args.get("tokenizer")
        if tok and not os.path.isdir(os.path.expanduser(tok)):
            raise PreflightError(f"tokenizer directory not found: {tok}")


# ---- tasks -------------------------------------------------------------------------------
_KEY = re.compile(r"""^["']?(task|group|tag)["']?\s*:\s*(.*)$""")
_ITEM = re.compile(r"""^\s*-\s+["']?([^"'#\s]+)["']?\s*$""")


def scan_task_names(root: str) -> set:
    """Names defined under ``root`` (task/group/tag keys of its YAMLs): a fast, slightly
    incomplete stand-in for lm-eval's index; a miss is confirmed with the real index."""
    names = set()
    for d, _, files in os.walk(root):
        for f in files:
            if not (f.endswith(".yaml") or f.endswith("_yaml")):
                continue
            with open(os.path.join(d, f), encoding="utf-8", errors="replace") as fh:
                lines = fh.read().splitlines()
            block = False
            for ln in lines:
                m = _KEY.match(ln)
                if m:
                    v = m.group(2).strip()
                    if v.startswith("["):
                        names.update(x.strip().strip("\"'") for x in v.strip("[]").split(",")
                                     if x.strip())
                        block = False
                    elif v:
                        names.add(v.strip("\"'"))
                        block = False
                    else:
                        block = True
                    continue
                if block:
                    mi = _ITEM.match(ln)
                    if mi:
                        names.add(mi.group(1))
                        continue
                    if ln and not ln[0].isspace():
                        block = False
    return names


def _builtin_tasks_dir():
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "tasks")


def check_tasks(tasks: list, include_paths: list, metadata: dict, exact: bool = True) -> list:
    """-> the tasks' names; PreflightError for an unknown name or missing local data."""
    if not tasks:
        raise PreflightError("no tasks given (--tasks)")
    table = task_table()
    included = set()  # names the --include_path folders define
    for r in include_paths:
        if os.path.isdir(r):
            included |= scan_task_names(r)
    known = set(included)
    builtin = _builtin_tasks_dir()
    if builtin and os.path.isdir(builtin):
        known |= scan_task_names(builtin)
    unknown = []
    for t in tasks:
        if t.endswith(".yaml") or os.path.isdir(t):
            continue  # lm-eval also accepts YAML files and folders
        if t in table:
            if t not in included:
                raise PreflightError(f"task {t!r} is one of this project's offline tasks: add "
                                     f"--include_path <repository>/{HARNESS_TASKS}")
            bench, subjects, splits = table[t]
            try:
                task_data.check(bench, subjects, splits, metadata)
            except task_data.TaskDataError as e:
                raise PreflightError(str(e)) from None
        elif t not in known:
            unknown.append(t)
    if unknown and exact:  # the fast scan can miss a few names; ask lm-eval's index
        from lm_eval.tasks import TaskManager
        tm = TaskManager(include_path=include_paths or None)
        everything = set(tm.all_tasks)
        unknown = [t for t in unknown if t not in everything]
        known |= everything
    if unknown:
        t = unknown[0]
        hints = difflib.get_close_matches(t, sorted(set(table) | known), n=3, cutoff=0.6)
        local = ", ".join(sorted(n for n in table if not any(n.startswith(
            p + "_") for p in ("mmlu_local", "cmmlu_local", "ceval_local-valid", "mp_tiny_mmlu"))))
        raise PreflightError(
            f"unknown task {t!r}" + (f"; did you mean {', '.join(hints)}?" if hints else "") +
            f" (offline tasks of this project: {local}; list all with "
            f"`lm-eval ls tasks --include_path {HARNESS_TASKS}`)")
    return tasks


def run(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--model", default="hf")
    p.add_argument("--model_args", nargs="*", default=None)
    p.add_argument("--tasks", nargs="*", default=None)
    p.add_argument("--include_path", default=None)
    p.add_argument("--metadata", nargs="*", default=None)
    a, _ = p.parse_known_args(argv)
    model_args = parse_kv(a.model_args)
    metadata = dict(model_args)
    if a.metadata:
        import json
        raw = " ".join(a.metadata)
        try:
            metadata.update(json.loads(raw))
        except ValueError:
            metadata.update(parse_kv(a.metadata))
    includes = [x for x in (a.include_path or "").split(":") if x]
    check_model(a.model, model_args)
    tasks = check_tasks(split_tasks(a.tasks), includes, metadata)
    return {"model": a.model, "tasks": tasks}


def main(argv=None) -> int:
    try:
        run(argv)
    except PreflightError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
