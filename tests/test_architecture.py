"""The layout and the promises of hopkit/_patch.py: acyclic imports, torch untouched until used.

NOTE [Changing torch only on use, reversibly] in hopkit/_patch.py.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import hopkit
from hopkit import _patch

PACKAGE = pathlib.Path(hopkit.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _module_level_imports(path: pathlib.Path) -> set[str]:
    """hopkit modules imported at module level (not in functions, not TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("hopkit"))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    mod = f"{base}.{node.module}" if node.module else base
                else:
                    mod = node.module or ""
                if mod.startswith("hopkit"):
                    found.add(mod)
                    for a in node.names:  # `from hopkit import _compat` imports a module
                        if (PACKAGE.parent / (mod + "." + a.name).replace(".", "/")).with_suffix(".py").exists() \
                                or (PACKAGE.parent / (mod + "." + a.name).replace(".", "/") / "__init__.py").exists():
                            found.add(f"{mod}.{a.name}")
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                visit(node.body)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
                visit(getattr(node, "orelse", []))
                visit(getattr(node, "finalbody", []))

    visit(tree.body)
    found.discard(here)
    return found


def _import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for dep in _module_level_imports(path):
            # importing a.b.c also runs a and a.b
            parts = dep.split(".")
            for k in range(1, len(parts) + 1):
                candidate = ".".join(parts[:k])
                if candidate in modules and candidate != name and not name.startswith(candidate + "."):
                    deps.add(candidate)
        graph[name] = deps
    return graph


def test_module_level_imports_are_acyclic() -> None:
    graph = _import_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if state.get(dep) is None:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


@pytest.mark.parametrize("bottom", ["hopkit._compat", "hopkit._patch", "hopkit._dispatch"])
def test_bottom_layer_imports_nothing_from_hopkit(bottom: str) -> None:
    deps = _import_graph()[bottom] - {"hopkit"}
    assert deps == set(), f"{bottom} imports {sorted(deps)}"


def _fresh(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def test_import_hopkit_changes_nothing_in_torch() -> None:
    # After `import hopkit` and a plain export + save + load of a model with no
    # HOP, nothing of torch was patched, and no import hook was installed.
    out = _fresh("""
        import io, sys
        import torch
        hooks_before = list(sys.meta_path)
        import hopkit
        from hopkit import _patch

        class M(torch.nn.Module):
            def forward(self, x):
                return x + 1

        buf = io.BytesIO()
        torch.export.save(torch.export.export(M(), (torch.ones(2),)), buf)
        buf.seek(0)
        torch.export.load(buf).module()(torch.ones(2))
        import types
        wrapped = [
            f"{m.__name__}.{k}" for m in list(sys.modules.values())
            if isinstance(m, types.ModuleType) and m.__name__.startswith("torch")
            for k, v in list(vars(m).items())
            if isinstance(v, types.FunctionType) and "__hopkit_original__" in v.__dict__
        ]
        print(_patch.live_patches(), sys.meta_path == hooks_before, wrapped)
    """)
    assert out == "[] True []"


def test_import_hopkit_then_debug_mode() -> None:
    # The import hook once started a circular import inside torch's own.
    assert _fresh("""
        import hopkit, torch
        from torch.utils._debug_mode import DebugMode
        with DebugMode():
            torch.ones(2) + 1
        print("ok")
    """) == "ok"


def test_a_hop_patches_only_what_it_uses_and_undo_restores() -> None:
    out = _fresh("""
        import sys, torch, hopkit
        from hopkit import _patch

        class H(hopkit.BaseHOP):
            def __init__(self):
                super().__init__("hopkit_test_arch_h")

        h = H()
        x = torch.randn(3)
        h(hopkit.FunctionWithNoFreeVars(lambda t: (t + 1,)), x)  # eager: nothing to patch
        before = sorted(p.key for p in _patch.live_patches())
        torch.compile(lambda t: h(lambda u: (u * 2,), t)[0], backend="inductor")(x)
        after = sorted(p.key for p in _patch.live_patches())
        import torch._dynamo.variables.higher_order_ops as hov
        import torch._inductor.lowering as lowering
        registered = ("hopkit_test_arch_h" in hov._hop_name_to_variable_class, h in lowering.lowerings)
        _patch.undo_all()
        undone = ("hopkit_test_arch_h" in hov._hop_name_to_variable_class, h in lowering.lowerings)
        print(before, registered, undone, _patch.live_patches(), _patch._finder in sys.meta_path)
    """)
    before, rest = out.split("] ", 1)
    assert before == "['sys.meta_path[hopkit import hook]'"
    assert rest == "(True, True) (False, False) [] False"


def test_a_raising_import_hook_callback_leaves_torch_importable(tmp_path: pathlib.Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "hopkit_canary_mod.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def broken(module: object) -> None:
        raise AttributeError("renamed_symbol")

    _patch.when_imported("hopkit_canary_mod", broken, why="teach the canary")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import hopkit_canary_mod  # type: ignore[import-not-found]
    assert hopkit_canary_mod.VALUE == 42
    assert [str(w.message) for w in caught] == [
        "hopkit: could not teach the canary when hopkit_canary_mod was imported "
        "(AttributeError: renamed_symbol); that feature is degraded. Please report "
        "this with your torch version."
    ]
    # The canary's callback is gone; the import hook itself stays while other
    # callbacks (HOPs created by other test modules) are still pending.
    assert "hopkit_canary_mod" not in _patch._pending
    assert (_patch._finder in sys.meta_path) == bool(_patch._pending)


def test_patch_function_undo_restores_every_consumer(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    def original(x: int) -> int:
        return x

    defining = types.ModuleType("hopkit_test_defining")
    defining.f = original  # type: ignore[attr-defined]
    early = types.ModuleType("hopkit_test_early")  # did `from defining import f` before
    early.f = original  # type: ignore[attr-defined]
    for mod in (defining, early):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)

    patch = _patch.patch_function(
        "hopkit_test_defining", "f", lambda orig: (lambda x: orig(x) + 1),
        consumers=("hopkit_test_early", "hopkit_test_late"), why="test",
    )
    assert patch is not None and patch.live and patch in _patch.live_patches()
    late = types.ModuleType("hopkit_test_late")  # imports it after the patch
    late.f = defining.f  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, late.__name__, late)
    assert defining.f(1) == early.f(1) == late.f(1) == 2  # type: ignore[attr-defined]
    assert _patch.original_of(defining.f) is original  # type: ignore[attr-defined]
    assert _patch.patch_function("hopkit_test_defining", "f", lambda o: o, why="test") is patch
    patch.undo()
    patch.undo()  # idempotent
    assert defining.f is early.f is late.f is original  # type: ignore[attr-defined]
    assert patch not in _patch.live_patches()


def test_missing_patch_site_warns_naming_it() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _patch.patch_function("torch.fx", "no_such_function", lambda o: o,
                                     why="do something") is None
    assert [str(w.message) for w in caught] == [
        "hopkit: torch has no torch.fx.no_such_function, which hopkit patches to do "
        "something; that feature is degraded on this torch release. Please report this."
    ]


def test_set_membership_records_torchs_state_and_undo_restores() -> None:
    table: set[str] = {"torchs"}
    _patch.set_membership(table, "mine", True, name="test-set[mine]")
    assert table == {"torchs", "mine"}
    assert [p.key for p in _patch.live_patches()][-1] == "test-set[mine]"
    _patch.set_membership(table, "mine", False, name="test-set[mine]")  # back to torch's
    assert table == {"torchs"} and "test-set[mine]" not in [p.key for p in _patch.live_patches()]
    _patch.set_membership(table, "torchs", True, name="test-set[torchs]")  # no change: no patch
    assert "test-set[torchs]" not in [p.key for p in _patch.live_patches()]
    _patch.set_membership(table, "torchs", False, name="test-set[torchs]")
    (patch,) = [p for p in _patch.live_patches() if p.key == "test-set[torchs]"]
    patch.undo()
    assert table == {"torchs"}
