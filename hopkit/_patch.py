"""The one home for changing torch: attribute patches, table entries, the import hook.

NOTE [Changing torch only on use, reversibly]
hopkit plugs into places of torch that offer no registration API (AOTAutograd
recognises torch's own ``with_effects`` by identity, Dynamo picks a HOP's
variable class from a dict, torch.export imports its autocast pass by name).
Every such change goes through this module, and:

* it is made on first use of the feature that needs it (the first effect
  registration, the first hopkit HOP created or traced, the first
  ``hopkit.export.export``), never by ``import hopkit`` and never by a plain
  torch API call in a program that uses no hopkit feature;
* it returns a :class:`Patch` whose ``undo()`` puts torch's original object
  back, in the defining module and in every module that had rebound it by
  ``from ... import name``;
* the wrapper it installs changes behaviour only for hopkit's own ops and
  HOPs: everything else is passed to torch's original untouched;
* a patch site missing on the running torch is a warning that names it (the
  feature then degrades), never silence and never an error inside torch's
  own import;
* a callback of the import hook that raises is reported once as a warning
  naming the module and what hopkit wanted to do, and torch's import goes on.

:func:`live_patches` lists what is installed now (the canary tests read it),
:func:`undo_all` removes everything.

It imports nothing from hopkit.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "Patch",
    "live_patches",
    "patch_function",
    "set_entry",
    "set_membership",
    "undo_all",
    "when_imported",
]

_lock = threading.RLock()
_live: dict[str, Patch] = {}
_WRAPPED = "__hopkit_original__"


class Patch:
    """One change hopkit made to torch; ``undo()`` reverts it (idempotent)."""

    def __init__(self, key: str, undo: Callable[[], None]) -> None:
        self.key = key
        self._undo: Callable[[], None] | None = undo

    @property
    def live(self) -> bool:
        return self._undo is not None

    def undo(self) -> None:
        with _lock:
            undo, self._undo = self._undo, None
            if undo is None:
                return
            undo()
            if _live.get(self.key) is self:
                del _live[self.key]

    def __repr__(self) -> str:
        return f"Patch({self.key!r}, {'live' if self.live else 'undone'})"


def live_patches() -> list[Patch]:
    """Every change hopkit has made to torch and not undone, oldest first."""
    with _lock:
        return list(_live.values())


def undo_all() -> None:
    """Undo every live patch, newest first (tests use this)."""
    for patch in reversed(live_patches()):
        patch.undo()


def _register(patch: Patch) -> Patch:
    _live[patch.key] = patch
    return patch


def _warn(message: str) -> None:
    warnings.warn(f"hopkit: {message}", RuntimeWarning, stacklevel=3)


def patch_function(
    module_name: str,
    name: str,
    make: Callable[[Any], Any],
    *,
    consumers: Sequence[str] = (),
    why: str,
) -> Patch | None:
    """Replace ``module_name.name`` with ``make(original)``, also where rebound.

    ``consumers`` are modules that do ``from module_name import name``; those
    already imported are rebound now, later ones import the wrapper itself.
    Installing the same site twice returns the live patch. A missing site
    warns, naming it and ``why`` hopkit wanted it, and returns None.
    """
    key = f"{module_name}.{name}"
    with _lock:
        existing = _live.get(key)
        if existing is not None:
            return existing
        module = importlib.import_module(module_name)
        original = getattr(module, name, None)
        if original is None:
            _warn(f"torch has no {key}, which hopkit patches to {why}; that "
                  f"feature is degraded on this torch release. Please report this.")
            return None
        wrapper = make(original)
        setattr(wrapper, _WRAPPED, original)
        setattr(module, name, wrapper)
        for consumer in consumers:
            cmod = sys.modules.get(consumer)
            if cmod is not None and getattr(cmod, name, None) is original:
                setattr(cmod, name, wrapper)

        def undo() -> None:
            for mod_name in (module_name, *consumers):
                mod = sys.modules.get(mod_name)
                if mod is not None and getattr(mod, name, None) is wrapper:
                    setattr(mod, name, original)

        return _register(Patch(key, undo))


def original_of(fn: Any) -> Any:
    """torch's original behind a hopkit wrapper (``fn`` itself if not wrapped)."""
    return getattr(fn, _WRAPPED, fn)


_MISSING = object()


def set_entry(table: dict[Any, Any], key: Any, value: Any, *, name: str) -> Patch:
    """``table[key] = value`` in one of torch's registries; undo restores it.

    ``name`` identifies the table and key for :func:`live_patches`.
    """
    with _lock:
        previous = table.get(key, _MISSING)
        table[key] = value

        def undo() -> None:
            if table.get(key, _MISSING) is not value:
                return  # replaced since: not ours to restore
            if previous is _MISSING:
                del table[key]
            else:
                table[key] = previous

        existing = _live.get(name)
        if existing is not None:
            # A second value for the same entry (a HOP re-created on module
            # reload): the first patch's undo must still restore torch's state.
            first_undo = existing._undo
            existing._undo = None

            def undo_both() -> None:
                undo()
                if first_undo is not None:
                    first_undo()

            return _register(Patch(name, undo_both))
        return _register(Patch(name, undo))


def set_membership(container: set[Any], item: Any, present: bool, *, name: str) -> None:
    """Add ``item`` to (or take it out of) one of torch's sets, e.g. FX's set of
    impure call targets; the first change records torch's own state, and a
    change back to it (or undo) removes the patch."""
    with _lock:
        existing = _live.get(name)
        if existing is None:
            before = item in container
            if before == present:
                return

            def undo() -> None:
                if before:
                    container.add(item)
                else:
                    container.discard(item)

            patch = _register(Patch(name, undo))
            patch.original_state = before  # type: ignore[attr-defined]
        elif present == getattr(existing, "original_state", None):
            existing.undo()
            return
        if present:
            container.add(item)
        else:
            container.discard(item)


# ---------------------------------------------------------------------------
# The import hook
# ---------------------------------------------------------------------------

_pending: dict[str, list[tuple[Callable[[types.ModuleType], None], str]]] = {}
_warned: set[tuple[str, str]] = set()


def _run(module: types.ModuleType, callback: Callable[[types.ModuleType], None], why: str) -> None:
    try:
        callback(module)
    except Exception as e:  # never break torch's own import
        if (module.__name__, why) not in _warned:
            _warned.add((module.__name__, why))
            _warn(f"could not {why} when {module.__name__} was imported "
                  f"({type(e).__name__}: {e}); that feature is degraded. Please "
                  f"report this with your torch version.")


def _initializing(module: types.ModuleType) -> bool:
    spec = getattr(module, "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


class _CallbackLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._loader.exec_module(module)
        with _lock:
            callbacks = _pending.pop(self._name, [])
            _maybe_remove_finder()
        for callback, why in callbacks:
            _run(module, callback, why)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _CallbackLoader(spec.loader, fullname)
                return spec
        return None


_finder = _PostImportFinder()


def _maybe_remove_finder() -> None:
    if not _pending and _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
        _live.pop("sys.meta_path[hopkit import hook]", None)


def when_imported(module_name: str, callback: Callable[[types.ModuleType], None], *,
                  why: str) -> None:
    """Run ``callback(module)`` now if ``module_name`` is imported, else right after.

    A module that is still executing (imported half-way, in a circular import
    inside torch) counts as not imported yet. The hook is on sys.meta_path
    only while callbacks are pending; ``why`` names what hopkit wants to do,
    for the warning if the callback raises.
    """
    with _lock:
        module = sys.modules.get(module_name)
        if module is not None and not _initializing(module):
            run_now = True
        else:
            run_now = False
            if module is not None:
                # Executing right now: its exec_module is already under way
                # and no finder will see it again; run after it, on first
                # look-up from hopkit (see ensure_imported_callbacks).
                _deferred.setdefault(module_name, []).append((callback, why))
                return
            _pending.setdefault(module_name, []).append((callback, why))
            if _finder not in sys.meta_path:
                sys.meta_path.insert(0, _finder)

                def remove() -> None:
                    _pending.clear()
                    if _finder in sys.meta_path:
                        sys.meta_path.remove(_finder)

                _register(Patch("sys.meta_path[hopkit import hook]", remove))
    if run_now:
        _run(module, callback, why)  # type: ignore[arg-type]


_deferred: dict[str, list[tuple[Callable[[types.ModuleType], None], str]]] = {}


def run_deferred_callbacks() -> None:
    """Run callbacks for modules that were half-imported when registered.

    Called from hopkit's rules before they rely on a registration (a HOP's
    proxy rule, before Inductor lowers it; Dynamo's own look-up happens after
    the module has finished importing, when this has run at HOP creation).
    """
    if not _deferred:
        return
    with _lock:
        ready = {n: cbs for n, cbs in _deferred.items()
                 if n in sys.modules and not _initializing(sys.modules[n])}
        for n in ready:
            del _deferred[n]
    for n, cbs in ready.items():
        for callback, why in cbs:
            _run(sys.modules[n], callback, why)
