"""One registry of monkey-patches per device backend.

A patch names its target by dotted path ("package.module.Class.attr"), says why it exists,
and gives either a ``replacement`` or a ``wrapper(original) -> replacement``. Applying is
idempotent; ``remove()`` restores every original (tests use that). A target that no longer
exists is a hard error: megatron-core changed and the patch must be re-checked.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional


class PatchTargetError(RuntimeError):
    """A registered patch target does not exist (the patched library changed)."""


def resolve(dotted: str):
    """Return (owner, attribute name, current value) for ``dotted``.

    The longest importable module prefix is imported; the rest is walked with getattr.
    """
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        mod_name = ".".join(parts[:cut])
        try:
            owner = importlib.import_module(mod_name)
        except ImportError:
            continue
        try:
            for name in parts[cut:-1]:
                owner = getattr(owner, name)
            return owner, parts[-1], getattr(owner, parts[-1])
        except AttributeError as exc:
            raise PatchTargetError(f"patch target {dotted!r} not found: {exc}") from None
    raise PatchTargetError(f"patch target {dotted!r}: no importable module prefix")


_MISSING = object()


@dataclass
class Patch:
    target: str
    reason: str
    replacement: Any = None
    wrapper: Optional[Callable[[Any], Any]] = None
    create: bool = False  # allow adding an attribute that does not exist yet
    _owner: Any = field(default=None, repr=False)
    _original: Any = field(default=_MISSING, repr=False)

    @property
    def applied(self) -> bool:
        return self._owner is not None

    @property
    def original(self):
        return None if self._original is _MISSING else self._original


class PatchRegistry:
    def __init__(self, name: str):
        self.name = name
        self._patches: dict[str, Patch] = {}

    def register(self, target: str, replacement: Any = None, *, wrapper=None,
                 reason: str, create: bool = False) -> Patch:
        if (replacement is None) == (wrapper is None):
            raise ValueError("give exactly one of replacement= or wrapper=")
        if target in self._patches:
            raise ValueError(f"{self.name}: patch for {target!r} registered twice")
        patch = Patch(target, reason, replacement, wrapper, create)
        self._patches[target] = patch
        return patch

    def __iter__(self):
        return iter(self._patches.values())

    def __len__(self):
        return len(self._patches)

    def __contains__(self, target: str) -> bool:
        return target in self._patches

    def get(self, target: str) -> Patch:
        return self._patches[target]

    def apply(self, defer_until_imported: tuple = ()) -> None:
        """Apply every registered patch not yet applied (idempotent).

        Patches whose target lies in one of ``defer_until_imported`` (package or module
        names, e.g. "megatron.core"; the first that matches a target counts) are applied
        the moment that module finishes importing, if it has not been imported yet: tools
        that never touch megatron-core (the converter without CHECK, data preprocessing)
        don't pay its multi-second import. A module imported in the middle of its package's
        import (``megatron.core.jit``) gets its patches then, and only those.
        """
        pending = {}
        for patch in self._patches.values():
            if patch.applied:
                continue
            root = next((pkg for pkg in defer_until_imported
                         if patch.target == pkg or patch.target.startswith(pkg + ".")), None)
            if root is not None and root not in sys.modules:
                pending.setdefault(root, []).append(patch)
                continue
            self._apply_one(patch)
        for root, patches in pending.items():
            when_imported(root, lambda patches=patches: [self._apply_one(p) for p in patches
                                                          if not p.applied])

    def _apply_one(self, patch: "Patch") -> None:
        try:
            owner, attr, current = resolve(patch.target)
        except PatchTargetError:
            if not patch.create:
                raise
            parent, attr = patch.target.rsplit(".", 1)
            owner, pattr, pval = resolve(parent)
            owner, current = pval, _MISSING
        # On classes keep the raw attribute (staticmethod/classmethod) for restoring.
        raw = owner.__dict__.get(attr, current) if isinstance(owner, type) else current
        if patch.wrapper is None:
            new = patch.replacement
        elif isinstance(raw, (classmethod, staticmethod)):
            new = type(raw)(patch.wrapper(raw.__func__))  # keep the decorator
        else:
            new = patch.wrapper(current)
        if isinstance(owner, type) and attr not in owner.__dict__:
            raw = _MISSING  # inherited: removing our override restores it
        setattr(owner, attr, new)
        patch._owner, patch._original = owner, raw

    def remove(self) -> None:
        """Restore every original, last applied first."""
        for patch in reversed(list(self._patches.values())):
            if not patch.applied:
                continue
            attr = patch.target.rsplit(".", 1)[1]
            if patch._original is _MISSING:
                delattr(patch._owner, attr)
            else:
                setattr(patch._owner, attr, patch._original)
            patch._owner, patch._original = None, _MISSING

    @property
    def applied(self) -> bool:
        return any(p.applied for p in self._patches.values())

    @property
    def all_applied(self) -> bool:
        return all(p.applied for p in self._patches.values())


class _PostImportHook:
    """Meta-path finder that runs callbacks right after ``name`` finishes importing."""

    def __init__(self, name: str):
        self.name = name
        self.callbacks = []

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # fires once; find the real spec without us
        _HOOKS.pop(self.name, None)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader, callbacks = spec.loader, self.callbacks
        exec_module = loader.exec_module

        def exec_then_patch(module):
            exec_module(module)
            for cb in callbacks:
                cb()

        loader.exec_module = exec_then_patch
        return spec


_HOOKS: dict = {}


def when_imported(name: str, callback) -> None:
    """Run ``callback()`` now if ``name`` is imported, else right after it is."""
    if name in sys.modules:
        callback()
        return
    hook = _HOOKS.get(name)
    if hook is None:
        hook = _HOOKS[name] = _PostImportHook(name)
        sys.meta_path.insert(0, hook)
    hook.callbacks.append(callback)
