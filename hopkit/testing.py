"""``hopkit.testing.hopcheck``: the ``torch.library.opcheck`` of higher-order operators.

    report = hopcheck(hop, subgraph, *operands, modes=None, **config)

In plain Python, hopcheck does::

    check hop, modes and config                # TypeError / ValueError, at once
    hop(subgraph, *operands, **config)         # BaseHOP: a call it refuses (its
                                               # own "hopkit: ..." error) is raised
    reference = subgraph(*operands)            # and its grads, by eager autograd
    for mode in modes:                         # eager, fake, make_fx_*, ...
        try:
            result = run hop(subgraph, *operands, **config) in mode,
                     on fresh clones of the operands
            assert result (outputs, grads, mutated operands) == reference
        except Exception as e:
            record mode as failed, with type(e).__name__ and its first line
    if any failed: raise HopCheckError(report)
    return report

A HOP with positional configuration before its subgraph (``leading_config``,
e.g. ``wrap_with_autocast(device_type, dtype, enabled, cache_enabled,
subgraph, *args)``) takes it positionally here too:
``hopcheck(wrap_with_autocast, "cpu", torch.bfloat16, True, None, body, x)``;
the reference then runs the subgraph under the HOP's ``subgraph_context``.

A HOP that is not a :class:`hopkit.BaseHOP` (such as
``hopkit.effects.with_effects``) has no subgraph semantics hopcheck knows of:
there, the first eager call of the HOP is the reference and "eager" checks that
a second call agrees with it.

The modes, in the order they run (``MODES``); each is a function ``_mode_*``
below, and the table ``_MODE_RUNNERS`` at the bottom maps names to them::

    eager              the HOP vs. calling the subgraph directly (grad on, off)
    schema             hop.gen_schema marks exactly the operands eager mutates
                       (BaseHOP only)
    fake               FakeTensorMode: output metadata (shape, dtype, device,
                       strides of dims longer than 1, requires_grad) as eager's
    make_fx_real       make_fx with tracing_mode real / fake / symbolic: exactly
    make_fx_fake       one call node of the HOP, its subgraph a GraphModule
    make_fx_symbolic   submodule, its config unchanged; the traced module
                       computes what eager does
    functionalize      torch.func.functionalize: values and mutated operands;
                       traced, still one node
    autograd           grads (for fixed random cotangents) equal eager autograd
                       of the plain subgraph; skipped if no operand needs grad
    gradcheck          gradcheck and gradgradcheck; skipped unless the operands
                       that require grad are all float64 (or complex128)
    compile_eager      torch.compile(fullgraph=True) with backend eager (one
    compile_aot_eager  node in the Dynamo graph), aot_eager (one node in the
    compile_inductor   AOT forward graph) and inductor: outputs, grads and
                       mutated operands equal eager's; Dynamo reset around each
    export_strict      torch.export.export strict / non-strict: one node; saved
    export_non_strict  to and loaded from a BytesIO: still one node, the same
                       config as keyword arguments, of exactly the same types
                       after loading (tuples stay tuples, 1 stays an int),
                       ep.module() computes what eager does, and so does the
                       loaded program after run_decompositions()

Opt-in modes (``OPT_IN_MODES``), run only when named (after the others),
because they are slow::

    aoti               AOTInductor: the exported program compiled with
                       torch._inductor.aoti_compile_and_package and loaded
                       with aoti_load_package computes what eager does, and
                       Inductor warns about nothing of the HOP's

``modes`` also takes these aliases (``_MODE_ALIASES``), each standing for
the modes after it::

    make_fx            make_fx_real, make_fx_fake, make_fx_symbolic
    compile            compile_eager, compile_aot_eager, compile_inductor
    aot_eager          compile_aot_eager
    inductor           compile_inductor
    export             export_strict, export_non_strict

("eager" is hopcheck's own eager mode, not ``torch.compile(backend="eager")``,
which is "compile_eager".)

The export modes load the saved program in this process; loading it elsewhere
needs the HOP created there first (import the module that defines it), as
``torch.export.load`` resolves it as ``torch.ops.higher_order.<name>``; hopkit's
error says which module (NOTE [Saving hopkit HOP nodes] in
hopkit/_serialization.py). The aoti mode, likewise, loads its package in this
process.

Every mode runs on fresh clones of the operands, so a subgraph that mutates an
operand is checked for the same mutation as eager. The subgraph must be
deterministic (no randomness): every mode is compared with one reference.

Only this module's callers import it: ``import hopkit`` does not, and importing
it does not import Dynamo or Inductor (each mode imports what it needs).
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import re
import reprlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.utils._pytree as pytree
from torch._ops import HigherOrderOperator

from hopkit.base_hop import BaseHOP, FunctionWithNoFreeVars

__all__ = ["MODES", "OPT_IN_MODES", "HopCheckError", "HopCheckReport", "ModeResult", "hopcheck"]

Status = Literal["passed", "failed", "skipped"]

#: Every mode hopcheck knows, in the order it runs them.
MODES: tuple[str, ...] = (
    "eager",
    "schema",
    "fake",
    "make_fx_real",
    "make_fx_fake",
    "make_fx_symbolic",
    "functionalize",
    "autograd",
    "gradcheck",
    "compile_eager",
    "compile_aot_eager",
    "compile_inductor",
    "export_strict",
    "export_non_strict",
)

#: Modes that run only when named in ``modes`` (slow), after those of MODES.
OPT_IN_MODES: tuple[str, ...] = ("aoti",)
_ALL_MODES: tuple[str, ...] = (*MODES, *OPT_IN_MODES)

# Names ``modes`` also accepts, each standing for the modes it lists (the
# module docstring lists them for users).
_MODE_ALIASES: dict[str, tuple[str, ...]] = {
    "make_fx": ("make_fx_real", "make_fx_fake", "make_fx_symbolic"),
    "compile": ("compile_eager", "compile_aot_eager", "compile_inductor"),
    "aot_eager": ("compile_aot_eager",),
    "inductor": ("compile_inductor",),
    "export": ("export_strict", "export_non_strict"),
}


# ---------------------------------------------------------------------------
# The report and the error
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class ModeResult:
    """One mode's outcome: ``status`` is "passed", "failed" or "skipped"."""

    mode: str
    status: Status
    reason: str = ""
    seconds: float = 0.0


@dataclasses.dataclass
class HopCheckReport:
    """What :func:`hopcheck` ran, what passed, why anything failed, how long it took."""

    hop: str
    results: list[ModeResult] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when no mode failed (skipped modes do not count as failures)."""
        return not self.failed

    @property
    def failed(self) -> list[ModeResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.results)

    def __getitem__(self, mode: str) -> ModeResult:
        for r in self.results:
            if r.mode == mode:
                return r
        raise KeyError(f"hopkit: mode {mode!r} did not run; it ran {[r.mode for r in self.results]}")

    def __str__(self) -> str:
        counts = {s: sum(r.status == s for r in self.results) for s in ("passed", "failed", "skipped")}
        width = max([len("mode"), *(len(r.mode) for r in self.results)])
        lines = [
            f"hopcheck({self.hop}): {counts['passed']} passed, {counts['failed']} failed, "
            f"{counts['skipped']} skipped in {self.seconds:.2f} s",
            f"{'mode':<{width}}  {'result':<7}  {'seconds':>7}  reason",
        ]
        for r in self.results:
            lines.append(f"{r.mode:<{width}}  {r.status:<7}  {r.seconds:>7.2f}  {r.reason}".rstrip())
        return "\n".join(lines)


class HopCheckError(AssertionError):
    """Raised by :func:`hopcheck` when a mode failed; ``.report`` has every mode."""

    def __init__(self, report: HopCheckReport) -> None:
        self.report = report
        failed = report.failed
        lines = [f"hopkit: hopcheck of {report.hop} failed in {len(failed)} of "
                 f"{len(report.results)} modes:"]
        lines += [f"  {r.mode}: {r.reason}" for r in failed]
        lines.append(
            f"Rerun one with hopcheck(..., modes=[{failed[0].mode!r}]) to debug it; "
            f"this error's .report lists every mode." if failed else ""
        )
        super().__init__("\n".join(lines).rstrip())


class _Skip(Exception):
    """A mode that does not apply to these operands (e.g. gradcheck on float32)."""


# ---------------------------------------------------------------------------
# The public entry point
# ---------------------------------------------------------------------------


def hopcheck(
    hop: HigherOrderOperator,
    subgraph: Any,
    /,
    *operands: Any,
    modes: Iterable[str] | str | None = None,
    **kwargs: Any,
) -> HopCheckReport:
    """Check, in one call, that ``hop`` works everywhere a torch user takes it.

    Args:
        hop: the HOP, usually a :class:`hopkit.BaseHOP` instance.
        subgraph: a ``torch.fx.GraphModule`` or :class:`hopkit.FunctionWithNoFreeVars`
            (as outside ``torch.compile``; the compile and export modes pass
            the same object). For a HOP with ``leading_config``, pass that
            configuration first, positionally, as you call the HOP.
        *operands: the subgraph's operands. Tensors are cloned afresh for every
            mode; use ``requires_grad=True`` ones to check autograd, float64
            ones to run gradcheck too. Keep shapes tiny: Inductor compiles.
        modes: the modes to run: a name from :data:`MODES` or an alias
            (``"make_fx"``, ``"compile"``, ``"aot_eager"``, ``"inductor"``,
            ``"export"``; see the module docstring), or a list of them; they
            run in the order of :data:`MODES`. ``None`` (the default) runs all
            of :data:`MODES`; the slow :data:`OPT_IN_MODES` (``"aoti"``) run
            only when named.
        **kwargs: the HOP's keyword configuration, passed on to every call;
            for a :class:`hopkit.BaseHOP`, constants only (no tensors,
            callables or modules: those are operands or belong in the subgraph).

    Returns:
        A :class:`HopCheckReport` (``print(report)`` shows a table).

    Raises:
        HopCheckError: one error listing each failed mode with its reason.
        TypeError: ``hop`` is not a HigherOrderOperator, ``modes`` is not a
            name or a list of names, the subgraph or the configuration is not
            what the HOP takes; or the HOP itself refused the arguments (its own
            ``hopkit:`` TypeError or ValueError, raised as it is). All of these
            are raised before any mode runs.
        ValueError: an unknown mode name (the error suggests the closest ones).
        RuntimeError: the reference itself (calling the subgraph directly)
            failed, so nothing could be compared.

    Example::

        report = hopcheck(invoke_quant, FunctionWithNoFreeVars(g),
                          torch.randn(3, dtype=torch.float64, requires_grad=True),
                          torch.randn(3, dtype=torch.float64), scheme="nf4")
    """
    selected = _select_modes(modes)
    _check_call(hop, (subgraph, *operands), kwargs)
    case = _Case(hop, (subgraph, *operands), kwargs)
    report = HopCheckReport(hop=f"torch.ops.higher_order.{hop.__name__}")
    for mode in selected:
        start = time.perf_counter()
        try:
            _MODE_RUNNERS[mode](case)
            status: Status = "passed"
            reason = ""
        except _Skip as e:
            status, reason = "skipped", str(e)
        except Exception as e:  # every mode reports; none stops the others
            status, reason = "failed", _short_reason(e)
        report.results.append(ModeResult(mode, status, reason, time.perf_counter() - start))
    if report.failed:
        raise HopCheckError(report)
    return report


def _select_modes(modes: object) -> list[str]:
    """The modes to run, in the order of MODES, from names and aliases."""
    if modes is None:
        return list(MODES)
    if isinstance(modes, str):
        names: list[object] = [modes]
    elif isinstance(modes, Iterable) and not isinstance(modes, (bytes, bytearray, Mapping)):
        names = list(modes)
    else:
        raise TypeError(
            f"hopkit: hopcheck expects modes to be a mode name, a list of mode names "
            f"or None (every mode), but got {_given(modes)}; pass e.g. "
            f"modes=['eager', 'fake'] or modes='make_fx'."
        )
    if not names:
        raise ValueError(
            "hopkit: hopcheck expects at least one mode, but modes is empty; name the "
            "modes to run (e.g. modes=['eager']), or pass modes=None for all of them."
        )
    chosen: set[str] = set()
    unknown: list[str] = []
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise TypeError(
                f"hopkit: hopcheck expects modes to hold mode names (str), but modes[{i}] "
                f"is {_given(name)}; pass names from hopkit.testing.MODES, e.g. "
                f"modes=['eager', 'fake']."
            )
        if name in _ALL_MODES:
            chosen.add(name)
        elif name in _MODE_ALIASES:
            chosen.update(_MODE_ALIASES[name])
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(
            f"hopkit: hopcheck expects mode names from hopkit.testing.MODES or their "
            f"aliases, but got {', '.join(_unknown_mode(m) for m in unknown)}; valid "
            f"modes are {', '.join(MODES)}; aliases are "
            + ", ".join(f"{a} ({', '.join(ms)})" for a, ms in _MODE_ALIASES.items())
            + "; or pass modes=None for all of them."
        )
    return [m for m in _ALL_MODES if m in chosen]


def _unknown_mode(name: str) -> str:
    """``'fakes' (did you mean 'fake'?)``: an unknown mode name and its near misses."""
    valid = [*_ALL_MODES, *_MODE_ALIASES]
    close = difflib.get_close_matches(name.lower().replace("-", "_").replace(" ", "_"), valid, n=3)
    if not close:
        return repr(name)
    quoted = [repr(c) for c in close]
    options = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
    return f"{name!r} (did you mean {options}?)"


def _names_modes(value: Any) -> bool:
    """Whether ``value`` is a mode name or a list of them (``mode=`` for ``modes=``)."""
    names = [value] if isinstance(value, str) else value
    return (
        isinstance(names, (list, tuple))
        and bool(names)
        and all(isinstance(n, str) and (n in _ALL_MODES or n in _MODE_ALIASES) for n in names)
    )


def _given(value: Any) -> str:
    """``int 42``: the type and a short repr of a value, for errors."""
    return f"{type(value).__name__} {reprlib.repr(value)}"


def _named(x: Any) -> str:
    """``the class InvokeQuant``, ``the function g``, ``the operator aten.sin.default``."""
    if isinstance(x, type):
        return f"the class {x.__qualname__}"
    if isinstance(x, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return f"the operator {x}"
    name = getattr(x, "__name__", None)
    if isinstance(name, str):
        return f"the {type(x).__name__} {name}"
    return f"a {type(x).__name__}"


def _check_call(hop: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Refuse what no mode could run, before the reference: HOP, subgraph, configuration."""
    if not isinstance(hop, HigherOrderOperator):
        if isinstance(hop, type) and issubclass(hop, HigherOrderOperator):
            fix = (
                f"pass its instance (e.g. the module-level object that "
                f"{hop.__name__}() returned), not the class"
            )
        elif isinstance(hop, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) or (
            type(hop).__name__ == "CustomOpDef"
        ):
            fix = "check an operator with torch.library.opcheck"
        elif _is_subgraph(hop) or callable(hop):
            fix = (
                "pass the HOP first, then its subgraph: hopcheck(hop, subgraph, *operands) "
                "(for an operator, use torch.library.opcheck)"
            )
        else:
            fix = "pass the HOP object, e.g. a hopkit.BaseHOP instance"
        raise TypeError(
            f"hopkit: hopcheck expects a HigherOrderOperator (e.g. a hopkit.BaseHOP "
            f"instance) first, but got {_named(hop)}; {fix}."
        )
    if "mode" in kwargs and _names_modes(kwargs["mode"]):
        raise TypeError(
            f"hopkit: hopcheck takes the modes to run as modes=, but got "
            f"mode={kwargs['mode']!r}, which it would pass to {hop.__name__} as "
            f"configuration; write modes={kwargs['mode']!r}."
        )
    if not isinstance(hop, BaseHOP):
        return
    n = hop._num_leading
    if n and len(args) > n:
        for i, value in enumerate(args[:n]):
            if _is_subgraph(value):
                raise TypeError(
                    f"hopkit: hopcheck calls {hop.__name__} as {hop.__name__}("
                    f"{', '.join(hop.leading_config)}, subgraph, *operands), but the "
                    f"subgraph is argument {i} ({hop.leading_config[i]}); pass all {n} "
                    f"configuration arguments before it."
                )
    if len(args) > n:
        subgraph = args[n]
        if not _is_subgraph(subgraph):
            lead = "".join(f"{name}, " for name in hop.leading_config)
            raise TypeError(
                f"hopkit: hopcheck calls {hop.__name__} outside torch.compile too, so "
                f"its subgraph must be a torch.fx.GraphModule or a "
                f"hopkit.FunctionWithNoFreeVars, but got a {type(subgraph).__name__}; "
                f"wrap the function: hopcheck(hop, {lead}"
                f"hopkit.FunctionWithNoFreeVars(fn), *operands)."
            )
        _check_config_values(hop, args[:n], kwargs)


def _check_config_values(hop: BaseHOP, leading: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """A BaseHOP's configuration is recorded on its node, never passed to the subgraph."""
    config = [*zip(hop.leading_config, leading), *((f"kwargs[{k!r}]", v) for k, v in kwargs.items())]
    for where, value in config:
        for path, leaf in pytree.tree_flatten_with_path(value)[0]:
            if isinstance(leaf, torch.Tensor):
                kind = "a Tensor"
            elif isinstance(leaf, torch.nn.Module):
                kind = f"a torch.nn.Module ({type(leaf).__name__})"
            elif callable(leaf):
                kind = f"a callable ({type(leaf).__name__})"
            else:
                continue
            raise TypeError(
                f"hopkit: hopcheck passes the configuration of {hop.__name__} to every "
                f"call, and configuration must be constants (str, int, float, bool, None, "
                f"torch.dtype, torch.device, enums, and tuples, lists or frozen "
                f"dataclasses of those), but {where}{pytree.keystr(path)} is {kind}; pass "
                f"tensors as operands after the subgraph, and call functions and modules "
                f"inside the subgraph."
            )


def _is_refusal(e: BaseException) -> bool:
    """A hopkit entry-point error: the HOP refusing its arguments, not a broken rule."""
    return isinstance(e, (TypeError, ValueError)) and str(e).startswith("hopkit:")


def _short_reason(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    first = lines[0].rstrip(",:") if lines else "(no message)"
    if len(first) > 240:
        first = first[:237] + "..."
    return f"{type(e).__name__}: {first}"


# ---------------------------------------------------------------------------
# One call of the HOP, its operands and its reference results
# ---------------------------------------------------------------------------


class _Case:
    """The HOP call under test: how to rebuild it on new tensors, and what eager gives.

    The arguments ``(*leading, subgraph, *operands)`` and ``kwargs`` are
    flattened with pytree; every tensor leaf is an operand that each mode
    replaces with its own clone (or fake, or traced stand-in).
    """

    def __init__(self, hop: HigherOrderOperator, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.hop = hop
        self.kwargs = kwargs
        self.is_base_hop = isinstance(hop, BaseHOP)
        if isinstance(hop, BaseHOP):
            if len(args) <= hop._num_leading:
                # Let the HOP word its own error for a missing subgraph.
                hop(*args, **kwargs)
            self.leading, self.subgraph, _ = hop._split(args)
            self.subgraph_index: int | None = hop._num_leading
        else:
            self.leading, self.subgraph = (), None
            self.subgraph_index = 0 if _is_subgraph(args[0]) else None
        self.args = args
        leaves, self.spec = pytree.tree_flatten((args, kwargs))
        self.leaves = leaves
        self.tensor_positions = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        self.originals: list[torch.Tensor] = [
            leaves[i].detach().clone().requires_grad_(leaves[i].requires_grad)
            for i in self.tensor_positions
        ]
        self.names = self._operand_names(args)
        self.diff = [
            k for k, t in enumerate(self.originals)
            if t.requires_grad and (t.is_floating_point() or t.is_complex())
        ]
        if self.is_base_hop:
            self._let_the_hop_refuse()
        self._compute_reference()

    def _let_the_hop_refuse(self) -> None:
        """Call the HOP once in eager: a call it refuses is an error now, in its words.

        A BaseHOP's reference calls the subgraph directly, so the HOP's own
        argument checks (e.g. wrap_with_autocast's configuration) would
        otherwise show only as the same failure in every mode. Any other
        error is left to the modes, which report it.
        """
        args, kwargs = self.rebuild(self.fresh(requires_grad=False))
        try:
            with torch.no_grad():
                self.hop(*args, **kwargs)
        except Exception as e:
            if _is_refusal(e):
                raise

    # -- operands ------------------------------------------------------------

    def _operand_names(self, args: tuple[Any, ...]) -> list[str]:
        paths, _ = pytree.tree_flatten_with_path((args, self.kwargs))
        offset = (self.subgraph_index or 0) + 1 if self.is_base_hop else 0
        base = "operands" if self.is_base_hop else "args"
        names = []
        for path, leaf in paths:
            if not isinstance(leaf, torch.Tensor):
                continue
            top, index = path[0], path[1]
            if getattr(top, "idx", None) == 0:  # positional
                rest = pytree.keystr(path[2:])
                names.append(f"{base}[{getattr(index, 'idx', 0) - offset}]{rest}")
            else:
                names.append(f"kwargs{pytree.keystr(path[1:])}")
        return names

    def fresh(self, requires_grad: bool = True) -> list[torch.Tensor]:
        """New clones of the tensor operands (detached unless ``requires_grad``)."""
        return [
            t.detach().clone().requires_grad_(requires_grad and t.requires_grad)
            for t in self.originals
        ]

    def rebuild(self, tensors: Sequence[Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        leaves = list(self.leaves)
        for i, t in zip(self.tensor_positions, tensors):
            leaves[i] = t
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        return tuple(args), dict(kwargs)

    def call(self, *tensors: Any) -> Any:
        """``hop(*args, **kwargs)`` with ``tensors`` as the operands."""
        args, kwargs = self.rebuild(tensors)
        return self.hop(*args, **kwargs)

    # -- the reference -------------------------------------------------------

    def _call_reference(self, tensors: Sequence[Any]) -> Any:
        args, kwargs = self.rebuild(tensors)
        if not isinstance(self.hop, BaseHOP):
            return self.hop(*args, **kwargs)
        leading, subgraph, operands = self.hop._split(args)
        with self.hop.subgraph_context(self.hop._config(leading, kwargs)):
            return subgraph(*operands)

    def _compute_reference(self) -> None:
        what = ("calling the subgraph directly" if self.is_base_hop
                else f"calling {self.hop.__name__} in eager")
        tensors = self.fresh()
        try:
            with torch.enable_grad():
                out = self._call_reference(tensors)
                self.cotangents = _cotangents(out)
                self.ref_grads = self._grads(out, tensors) if self.diff else []
        except Exception as e:
            if not self.is_base_hop and _is_refusal(e):
                raise  # the HOP refused the call: its own words say what to fix
            raise RuntimeError(
                f"hopkit: hopcheck could not compute its reference: {what} raised "
                f"{_short_reason(e)}. Fix the subgraph or the operands first; "
                f"hopcheck compares every mode with this reference."
            ) from e
        self.ref_out = pytree.tree_map_only(torch.Tensor, lambda t: t, out)
        self.ref_after = [t.detach().clone() for t in tensors]

    def _grads(self, out: Any, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Grads of the operands that require grad, for the fixed cotangents."""
        leaves = pytree.tree_leaves(out)
        pairs = [(o, c) for o, c in zip(leaves, self.cotangents) if c is not None]
        inputs = [tensors[k] for k in self.diff]
        if not pairs:
            return [torch.zeros_like(t) for t in inputs]
        grads = torch.autograd.grad(
            [o for o, _ in pairs], inputs, [c for _, c in pairs], allow_unused=True
        )
        return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]

    # -- comparisons -----------------------------------------------------------

    def check_values(self, out: Any, tensors: Sequence[Any] | None, where: str) -> None:
        """Outputs equal the reference's; so do the operands after the call."""
        _check_structure(out, self.ref_out, where)
        for name, a, b in _named_leaves(out, self.ref_out):
            _check_close(a, b, f"{name} {where}")
        if tensors is not None:
            for name, a, b in zip(self.names, tensors, self.ref_after):
                _check_close(a, b, f"{name} after the call {where}",
                             differs="was mutated differently than in eager")

    def check_grads(self, out: Any, tensors: Sequence[torch.Tensor], where: str) -> None:
        """``out`` requires grad where eager's does; its grads equal eager's."""
        for name, a, b in _named_leaves(out, self.ref_out):
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) \
                    and a.requires_grad != b.requires_grad:
                raise AssertionError(
                    f"{name} {where} has requires_grad={a.requires_grad}, but "
                    f"{b.requires_grad} in eager"
                )
        grads = self._grads(out, tensors)
        for k, g, ref in zip(self.diff, grads, self.ref_grads):
            _check_close(g, ref, f"grad of {self.names[k]} {where}")

    def check_graph(self, gm: torch.fx.GraphModule, where: str, exact: bool = False) -> None:
        """Exactly one call of the HOP, its subgraph a submodule, its config kept.

        ``exact``: the config also has exactly the types it was given, all the
        way down (a tuple is no list, 1 is no 1.0 or True).
        """
        name = f"torch.ops.higher_order.{self.hop.__name__}"
        nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is self.hop]
        if len(nodes) != 1:
            raise AssertionError(
                f"the {where} graph has {len(nodes)} calls of {name}, expected exactly "
                f"one (the proxy rule must emit one call_function node, not inline "
                f"the subgraph)"
            )
        (node,) = nodes
        if self.subgraph_index is not None:
            sub = node.args[self.subgraph_index] if len(node.args) > self.subgraph_index else None
            module = (
                _get_attr(gm, sub.target)
                if isinstance(sub, torch.fx.Node) and sub.op == "get_attr"
                and isinstance(sub.target, str) else None
            )
            if not isinstance(module, torch.fx.GraphModule):
                raise AssertionError(
                    f"in the {where} graph, argument {self.subgraph_index} of {name} is "
                    f"{sub!r}, expected a get_attr of a GraphModule submodule (the "
                    f"traced subgraph)"
                )
        n = len(self.leading)
        if tuple(node.args[:n]) != tuple(self.leading):
            raise AssertionError(
                f"in the {where} graph, {name}'s leading configuration is "
                f"{tuple(node.args[:n])!r}, expected {tuple(self.leading)!r}"
            )
        if self.is_base_hop and dict(node.kwargs) != self.kwargs:
            raise AssertionError(
                f"in the {where} graph, {name}'s keyword configuration is "
                f"{dict(node.kwargs)!r}, expected {self.kwargs!r}"
            )
        if exact:
            given = [*zip(_leading_names(self.hop, n), self.leading, node.args[:n])]
            if self.is_base_hop:
                given += [(f"kwarg {k!r}", v, node.kwargs[k]) for k, v in self.kwargs.items()]
            for what, expected, actual in given:
                if not _exactly_equal(actual, expected):
                    raise AssertionError(
                        f"in the {where} graph, {name}'s config {what} is "
                        f"{_typed(actual)}, expected {_typed(expected)}"
                    )


def _leading_names(hop: HigherOrderOperator, n: int) -> list[str]:
    names = getattr(hop, "leading_config", ())
    return [f"argument {names[i]!r}" if i < len(names) else f"argument {i}" for i in range(n)]


def _exactly_equal(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (FX's immutable_list and
    immutable_dict count as list and dict: FX stores every node's that way)."""
    same_kind = type(a) is type(b) or (isinstance(a, list) and isinstance(b, list)) or (
        isinstance(a, dict) and isinstance(b, dict))
    if not same_kind:
        return False
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_exactly_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_exactly_equal(a[k], b[k]) for k in a)
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return all(_exactly_equal(getattr(a, f.name), getattr(b, f.name))
                   for f in dataclasses.fields(a))
    if isinstance(a, float) and a != a:
        return b != b  # nan
    return bool(a == b)


def _typed(value: Any) -> str:
    """``tuple ('a', 'b')``: a config value with its type, for errors."""
    return f"{type(value).__name__} {value!r}"


def _is_subgraph(x: Any) -> bool:
    return isinstance(x, (torch.fx.GraphModule, FunctionWithNoFreeVars))


def _get_attr(root: torch.nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _cotangents(out: Any) -> list[torch.Tensor | None]:
    """A fixed random cotangent for each output that requires grad."""
    gen = torch.Generator().manual_seed(0)
    cots: list[torch.Tensor | None] = []
    for o in pytree.tree_leaves(out):
        if isinstance(o, torch.Tensor) and o.requires_grad:
            c = torch.randn(o.shape, generator=gen, dtype=torch.float64)
            cots.append(c.to(dtype=o.dtype, device=o.device))
        else:
            cots.append(None)
    return cots


def _named_leaves(actual: Any, expected: Any) -> list[tuple[str, Any, Any]]:
    paths, _ = pytree.tree_flatten_with_path(expected)
    return [
        (f"output{pytree.keystr(path)}", a, b)
        for (path, b), a in zip(paths, pytree.tree_leaves(actual))
    ]


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return "a Tensor"
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of {len(x)}"
    return f"a {type(x).__name__}"


def _check_structure(actual: Any, expected: Any, where: str) -> None:
    if pytree.tree_structure(actual) != pytree.tree_structure(expected):
        raise AssertionError(
            f"the output {where} is {_describe(actual)}, but {_describe(expected)} in "
            f"eager (pytree structures {pytree.tree_structure(actual)} vs "
            f"{pytree.tree_structure(expected)})"
        )


def _check_close(actual: Any, expected: Any, what: str,
                 differs: str = "differs from eager") -> None:
    if not isinstance(expected, torch.Tensor):
        if actual != expected:
            raise AssertionError(f"{what} is {actual!r}, expected {expected!r}")
        return
    if not isinstance(actual, torch.Tensor):
        raise AssertionError(f"{what} is {_describe(actual)}, expected a Tensor")
    try:
        torch.testing.assert_close(actual.detach(), expected.detach(), equal_nan=True)
    except AssertionError as e:
        # assert_close's first line ("Tensor-likes are not close!") says little;
        # keep how many elements differ and by how much, on one line.
        details = [line.strip() for line in str(e).splitlines()
                   if line.strip().startswith(("Mismatched elements", "Greatest absolute"))]
        summary = "; ".join(details) or _short_reason(e)
        raise AssertionError(f"{what} {differs}: {summary}") from None


def _check_metadata(actual: Any, expected: Any, where: str) -> None:
    _check_structure(actual, expected, where)
    for name, a, b in _named_leaves(actual, expected):
        if not isinstance(b, torch.Tensor):
            continue
        if not isinstance(a, torch.Tensor):
            raise AssertionError(f"{name} {where} is {_describe(a)}, expected a Tensor")
        for attr, va, vb in (
            ("shape", tuple(a.shape), tuple(b.shape)),
            ("dtype", a.dtype, b.dtype),
            ("device", a.device, b.device),
            ("strides", _strides(a), _strides(b)),
            ("requires_grad", a.requires_grad, b.requires_grad),
        ):
            if va != vb:
                raise AssertionError(f"{name} {where} has {attr} {va}, but {vb} in eager")


def _strides(t: torch.Tensor) -> tuple[int, ...] | None:
    """Strides of the dims longer than 1 (the others never address memory)."""
    if t.layout is not torch.strided:
        return None
    return tuple(s for s, n in zip(t.stride(), t.shape) if n > 1)


# ---------------------------------------------------------------------------
# Modes, in the order they run
# ---------------------------------------------------------------------------


def _mode_eager(case: _Case) -> None:
    """The HOP called directly equals the reference, with grad enabled and disabled."""
    for grad in (True, False):
        tensors = case.fresh(requires_grad=grad)
        with torch.set_grad_enabled(grad):
            out = case.call(*tensors)
        case.check_values(out, tensors, "in eager" + ("" if grad else " under no_grad"))


def _mode_schema(case: _Case) -> None:
    """``hop.gen_schema`` marks exactly the operands eager mutates, and counts the outputs."""
    if not isinstance(case.hop, BaseHOP):
        raise _Skip(f"{type(case.hop).__name__} is not a hopkit.BaseHOP (no gen_schema)")
    args, kwargs = case.rebuild(case.fresh(requires_grad=False))
    schema = case.hop.gen_schema(*args, **kwargs)
    marked = sorted(
        int(a.name[3:]) for a in schema.arguments
        if a.name.startswith("arg") and a.name[3:].isdigit()
        and a.alias_info is not None and a.alias_info.is_write
    )
    mutated = sorted(
        int(name[len("operands["):-1])
        for name, before, after in zip(case.names, case.originals, case.ref_after)
        if re.fullmatch(r"operands\[\d+\]", name) and not torch.equal(before.detach(), after)
    )
    if marked != mutated:
        raise AssertionError(
            f"gen_schema marks operands {marked} as mutated, but eager mutates "
            f"operands {mutated}: {schema}"
        )
    num_outputs = len(pytree.tree_leaves(case.ref_out))
    if len(schema.returns) != num_outputs:
        raise AssertionError(
            f"gen_schema has {len(schema.returns)} returns, but the subgraph returns "
            f"{num_outputs} values: {schema}"
        )


def _mode_fake(case: _Case) -> None:
    """Under FakeTensorMode the outputs have eager's metadata."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    fakes = [mode.from_tensor(t) for t in case.fresh()]
    with torch.enable_grad(), mode:
        out = case.call(*fakes)
    _check_metadata(out, case.ref_out, "under FakeTensorMode")


def _make_fx_mode(tracing_mode: Literal["real", "fake", "symbolic"]) -> Callable[[_Case], None]:
    def run(case: _Case) -> None:
        """make_fx traces one node, and the traced module computes eager's values."""
        from torch.fx.experimental.proxy_tensor import make_fx

        gm = make_fx(case.call, tracing_mode=tracing_mode)(*case.fresh(requires_grad=False))
        case.check_graph(gm, f"make_fx({tracing_mode!r})")
        tensors = case.fresh(requires_grad=False)
        case.check_values(gm(*tensors), tensors, f"from the make_fx({tracing_mode!r}) module")

    return run


def _mode_functionalize(case: _Case) -> None:
    """torch.func.functionalize keeps values and mutations, and traces to one node."""
    from torch.fx.experimental.proxy_tensor import make_fx

    functional = torch.func.functionalize(case.call)
    tensors = case.fresh(requires_grad=False)
    case.check_values(functional(*tensors), tensors, "under functionalize")
    gm = make_fx(functional)(*case.fresh(requires_grad=False))
    case.check_graph(gm, "make_fx(functionalize(...))")


def _mode_autograd(case: _Case) -> None:
    """Grads through the HOP equal eager autograd of the plain subgraph."""
    if not case.diff:
        raise _Skip("no operand requires grad")
    tensors = case.fresh()
    with torch.enable_grad():
        out = case.call(*tensors)
        case.check_values(out, None, "with autograd")
        case.check_grads(out, tensors, "through the HOP")


def _mode_gradcheck(case: _Case) -> None:
    """torch.autograd.gradcheck and gradgradcheck, in float64."""
    if not case.diff:
        raise _Skip("no operand requires grad")
    dtypes = sorted({str(case.originals[k].dtype) for k in case.diff})
    if any(case.originals[k].dtype not in (torch.float64, torch.complex128) for k in case.diff):
        raise _Skip(f"operands that require grad are {', '.join(dtypes)}, not float64")
    # Only outputs that require grad in eager are differentiable outputs.
    diff_outputs = [i for i, c in enumerate(case.cotangents) if c is not None]

    def fn(*diff_tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tensors: list[torch.Tensor] = case.fresh(requires_grad=False)
        for k, t in zip(case.diff, diff_tensors):
            tensors[k] = t
        leaves = pytree.tree_leaves(case.call(*tensors))
        return tuple(leaves[i] for i in diff_outputs)

    inputs = tuple(case.fresh()[k] for k in case.diff)
    with torch.enable_grad():
        torch.autograd.gradcheck(fn, inputs)
        torch.autograd.gradgradcheck(fn, inputs)


def _compile_mode(backend_name: str) -> Callable[[_Case], None]:
    def run(case: _Case) -> None:
        """torch.compile(fullgraph=True): values, grads and mutations equal eager's."""
        import torch._dynamo

        graphs: list[torch.fx.GraphModule] = []
        backend: Any = backend_name
        if backend_name == "eager":

            def backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
                graphs.append(gm)
                return gm.forward

        elif backend_name == "aot_eager":
            from torch._dynamo.backends.debugging import aot_eager

            def backend(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
                def fw_compiler(fw: torch.fx.GraphModule, _: Any) -> Any:
                    if not graphs:  # the forward graph (backward comes later)
                        graphs.append(fw)
                    return fw.forward

                return aot_eager(gm, example_inputs, fw_compiler=fw_compiler)

        torch._dynamo.reset()
        try:
            compiled = torch.compile(case.call, backend=backend, fullgraph=True)
            tensors = case.fresh()
            with torch.enable_grad():
                out = compiled(*tensors)
                where = f"from torch.compile(backend={backend_name!r})"
                case.check_values(out, tensors, where)
                if graphs:
                    case.check_graph(graphs[0], "Dynamo" if backend_name == "eager" else "AOT forward")
                if case.diff:
                    case.check_grads(out, tensors, where)
        finally:
            torch._dynamo.reset()

    return run


class _ExportedCall(torch.nn.Module):
    def __init__(self, case: _Case) -> None:
        super().__init__()

        # A plain function, not the case itself: export deep-copies the module.
        def call(*tensors: torch.Tensor) -> Any:
            return case.call(*tensors)

        self.call = call

    def forward(self, *tensors: torch.Tensor) -> Any:
        return self.call(*tensors)


def _export_mode(strict: bool) -> Callable[[_Case], None]:
    def run(case: _Case) -> None:
        """export, save, load: one node, config as kwargs, eager's values."""
        import torch._dynamo

        kind = "strict" if strict else "non-strict"
        torch._dynamo.reset()
        try:
            ep = torch.export.export(
                _ExportedCall(case), tuple(case.fresh(requires_grad=False)), strict=strict
            )
        finally:
            torch._dynamo.reset()
        case.check_graph(ep.graph_module, f"torch.export ({kind})")
        buffer = io.BytesIO()
        torch.export.save(ep, buffer)
        buffer.seek(0)
        loaded = torch.export.load(buffer)
        case.check_graph(loaded.graph_module, f"loaded torch.export ({kind})", exact=True)
        tensors = case.fresh(requires_grad=False)
        case.check_values(loaded.module()(*tensors), tensors,
                          f"from the loaded torch.export ({kind}) program")
        decomposed = loaded.run_decompositions()
        case.check_graph(decomposed.graph_module, f"run_decompositions() ({kind})", exact=True)
        tensors = case.fresh(requires_grad=False)
        case.check_values(decomposed.module()(*tensors), tensors,
                          f"after run_decompositions() ({kind})")

    return run


def _mode_aoti(case: _Case) -> None:
    """AOTInductor: compiled and packaged, loaded, eager's values; no warning about the HOP."""
    import os
    import tempfile
    import warnings

    import torch._dynamo
    import torch._inductor

    torch._dynamo.reset()
    try:
        ep = torch.export.export(
            _ExportedCall(case), tuple(case.fresh(requires_grad=False)), strict=False)
        case.check_graph(ep.graph_module, "torch.export (for AOTInductor)")
        with tempfile.TemporaryDirectory(prefix="hopcheck_aoti_") as directory:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                path = torch._inductor.aoti_compile_and_package(
                    ep, package_path=os.path.join(directory, "hopcheck.pt2"))
            about_hop = [str(w.message) for w in caught
                         if case.hop.__name__ in str(w.message) or "hopkit" in str(w.message)]
            if about_hop:
                raise AssertionError(
                    f"Inductor warned while compiling the AOTInductor package: {about_hop[0]}")
            package = torch._inductor.aoti_load_package(path)
            tensors = case.fresh(requires_grad=False)
            case.check_values(package(*tensors), tensors, "from the AOTInductor package")
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------
# Registration: one line per mode (the table of contents)
# ---------------------------------------------------------------------------

_MODE_RUNNERS: dict[str, Callable[[_Case], None]] = {
    "eager": _mode_eager,
    "schema": _mode_schema,
    "fake": _mode_fake,
    "make_fx_real": _make_fx_mode("real"),
    "make_fx_fake": _make_fx_mode("fake"),
    "make_fx_symbolic": _make_fx_mode("symbolic"),
    "functionalize": _mode_functionalize,
    "autograd": _mode_autograd,
    "gradcheck": _mode_gradcheck,
    "compile_eager": _compile_mode("eager"),
    "compile_aot_eager": _compile_mode("aot_eager"),
    "compile_inductor": _compile_mode("inductor"),
    "export_strict": _export_mode(strict=True),
    "export_non_strict": _export_mode(strict=False),
    # opt-in (OPT_IN_MODES)
    "aoti": _mode_aoti,
}
assert tuple(_MODE_RUNNERS) == _ALL_MODES, "every mode has exactly one runner, in order"
assert not set(_MODE_ALIASES) & set(_ALL_MODES) and all(
    set(modes) <= set(_ALL_MODES) for modes in _MODE_ALIASES.values()
), "an alias is no mode's name and stands for modes only"
