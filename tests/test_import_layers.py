"""The import graph of megatron_patch points one way (docs/architecture.md): no module
imports a module of a higher layer -- at the top or inside a function -- and the modules
the launcher and the shape tools use import no torch, numpy or megatron at all."""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "megatron_patch")

# (module prefix, layer); the longest matching prefix wins
LAYERS = [
    ("megatron_patch.cli_args", 0),
    ("megatron_patch.fsutil", 0),
    ("megatron_patch.ports", 0),
    ("megatron_patch.warnings_policy", 0),
    ("megatron_patch.models.llama.arch", 0),
    ("megatron_patch.models.llama.presets", 0),
    ("megatron_patch.models.llama.resolve", 0),
    ("megatron_patch.models.llama.parallel_layout", 0),
    ("megatron_patch.transformer", 1),
    ("megatron_patch.tokenizer", 1),
    ("megatron_patch.backends", 2),
    ("megatron_patch.parallel", 2),
    ("megatron_patch.models", 3),
    ("megatron_patch.checkpoint", 4),
    ("megatron_patch.data", 4),
    ("megatron_patch.conversion", 5),
    ("megatron_patch.training", 5),
    ("megatron_patch.inference", 5),
    ("megatron_patch.evaluation", 6),
]
# importable without torch (the launcher validates its arguments in well under a second)
LIGHT = ["megatron_patch.evaluation.preflight", "megatron_patch.evaluation.task_data",
         "megatron_patch.cli_args", "megatron_patch.fsutil", "megatron_patch.ports",
         "megatron_patch.warnings_policy",
         "megatron_patch.models.llama.arch",
         "megatron_patch.models.llama.presets", "megatron_patch.models.llama.resolve",
         "megatron_patch.models.llama.parallel_layout", "megatron_patch.training.config",
         "megatron_patch.training.arguments", "megatron_patch.training.launch_plan",
         "megatron_patch.training.lifetime"]
HEAVY = ("torch", "numpy", "megatron", "transformers", "safetensors", "torchao")


def layer_of(module: str):
    best = None
    for prefix, layer in LAYERS:
        if (module == prefix or module.startswith(prefix + ".")) and \
                (best is None or len(prefix) > len(best[0])):
            best = (prefix, layer)
    return None if best is None else best[1]


def modules():
    out = {}
    for d, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                is_pkg = rel.endswith(".__init__")
                out[rel[: -len(".__init__")] if is_pkg else rel] = (path, is_pkg)
    return out


def imports_of(module: str, path: str, is_pkg: bool) -> set:
    """Every module named by an import statement anywhere in the file (``from a import b``
    counts as a.b when that is a module, else a)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    package = module if is_pkg else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{a.name}" for a in node.names)
    return found


MODULES = modules()


def test_every_module_has_a_layer():
    missing = [m for m in MODULES if m != "megatron_patch" and layer_of(m) is None]
    assert not missing, f"add these to LAYERS (and docs/architecture.md): {missing}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "megatron_patch"))
def test_no_import_points_up(module):
    path, is_pkg = MODULES[module]
    mine = layer_of(module)
    up = []
    for name in imports_of(module, path, is_pkg):
        if name in MODULES and name != "megatron_patch":
            other = layer_of(name)
            if other is not None and other > mine:
                up.append(f"{name} (layer {other})")
    assert not up, f"{module} (layer {mine}) imports a higher layer: {sorted(set(up))}"


@pytest.mark.parametrize("module", LIGHT)
def test_light_modules_import_nothing_heavy(module):
    seen, todo, heavy = set(), [module], []
    while todo:  # follow megatron_patch imports transitively
        m = todo.pop()
        if m in seen or m not in MODULES:
            continue
        seen.add(m)
        path, is_pkg = MODULES[m]
        for name in imports_of(m, path, is_pkg):
            if name.split(".")[0] in HEAVY:
                heavy.append(f"{m} imports {name}")
            elif name.startswith("megatron_patch"):
                todo.append(name)
                # importing a submodule runs its packages' __init__ files
                parts = name.split(".")
                todo.extend(".".join(parts[:i]) for i in range(2, len(parts)))
    assert not heavy, heavy


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a layer-3 module importing training (layer 5) inside a function
    is reported."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from megatron_patch.training import loop\n")
    names = imports_of("megatron_patch.models.llama.m", str(f), False)
    assert "megatron_patch.training.loop" in names
    assert layer_of("megatron_patch.training.loop") > layer_of("megatron_patch.models.llama.m")
