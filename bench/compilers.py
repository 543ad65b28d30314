"""The compilers a case runs under, as pluggable entries.

In: names such as ``eager``, ``torch.compile`` (PyTorch's inductor, the reference)
and ``kiln:<backend>`` (``kiln.compile(model, backend=<backend>)``), ``kiln+ca:<backend>`` (the
same, with the training step's backward through compiled autograd). Out:
:class:`Compiler` objects whose ``wrap(model)`` returns the callable to time.
``wrap`` may raise: the harness records the exception as the case's failure
reason for that compiler (never drops it). Graph/break counts come from
``graph_stats`` (kiln.explain for kiln, dynamo's counters for torch.compile).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

# NOTE: when kiln.backends.list_backends is missing (or raises), these are the kiln
# backends the suite expects to exist; each then shows as failed with the reason.
EXPECTED_KILN_BACKENDS = ("eager", "aot_eager", "inductor")
# NOTE: debug-tagged kiln backends that are still worth a column: they time capture
# (eager) and capture + AOT autograd (aot_eager) without codegen.
DEBUG_BACKENDS_WANTED = ("eager", "aot_eager")
# NOTE: kiln backends that only make sense on one device.
DEVICE_ONLY = {"cudagraphs": "cuda"}


@dataclass(frozen=True)
class Compiler:
    """One column of the results: how a model is turned into the callable we time."""

    name: str
    kind: str  # "eager" | "torch" | "kiln"
    backend: str | None = None
    mode: str | None = None  # e.g. "reduce-overhead" (CUDA graphs), from "name@mode"

    def wrap(self, model: Callable[..., Any]) -> Callable[..., Any]:
        """Return the callable for ``model``; raises whatever the compiler raises."""
        return _WRAP[self.kind](self, model)


def _wrap_eager(c: Compiler, model: Callable[..., Any]) -> Callable[..., Any]:
    return model


def _wrap_torch(c: Compiler, model: Callable[..., Any]) -> Callable[..., Any]:
    return torch.compile(model, backend=c.backend or "inductor", mode=c.mode)


def _wrap_kiln(c: Compiler, model: Callable[..., Any]) -> Callable[..., Any]:
    kiln = importlib.import_module("kiln")
    compile_fn = getattr(kiln, "compile")  # AttributeError/ImportError while capture/ is missing
    return compile_fn(model, backend=c.backend, mode=c.mode)


def _wrap_kiln_ca(c: Compiler, model: Callable[..., Any]) -> Callable[..., Any]:
    """``kiln+ca:<backend>``: the forward as ``kiln:<backend>``, and the backward a training
    step runs captured by compiled autograd (the whole backward, accumulation included, as
    one graph compiled with the same backend); ``measure.make_step`` enters
    ``backward_context`` around ``loss.backward()``."""
    kiln = importlib.import_module("kiln")
    ca = importlib.import_module("kiln.compiled_autograd")
    compiled = kiln.compile(model, backend=c.backend, mode=c.mode)

    def fn(*args: Any, **kwargs: Any) -> Any:
        return compiled(*args, **kwargs)

    def compiler_fn(gm: Any) -> Callable[..., Any]:
        return kiln.compile(gm, backend=c.backend)

    # NOTE: one compiler_fn for every step: compiled autograd's cache is per compiler_fn
    fn.backward_context = lambda: ca.enable(compiler_fn)  # type: ignore[attr-defined]
    return fn


_WRAP: dict[str, Callable[[Compiler, Callable[..., Any]], Callable[..., Any]]] = {
    "eager": _wrap_eager,
    "torch": _wrap_torch,
    "kiln": _wrap_kiln,
    "kiln_ca": _wrap_kiln_ca,
}


def kiln_backends(device: str) -> tuple[list[str], str | None]:
    """Names of kiln's registered backends that apply to ``device``, and a note when the list had to be guessed."""
    try:
        kiln = importlib.import_module("kiln")
        every = set(kiln.list_backends(exclude_tags=()))
        names = [n for n in DEBUG_BACKENDS_WANTED if n in every] + list(kiln.list_backends())
        note = None
    except Exception as e:  # NOTE: the registry may not exist yet; fall back and say so.
        names, note = list(EXPECTED_KILN_BACKENDS), f"kiln.list_backends unavailable ({type(e).__name__}: {e})"
    names = list(dict.fromkeys(names))
    return [n for n in names if DEVICE_ONLY.get(n, device) == device], note


def parse(spec: str | None, device: str) -> tuple[list[Compiler], list[str]]:
    """Turn ``--backends`` (comma list; ``kiln`` = every kiln backend) into compilers, plus notes for the report."""
    notes: list[str] = []
    tokens = [t.strip() for t in (spec or "eager,torch.compile,kiln").split(",") if t.strip()]
    out: list[Compiler] = []
    for tok in tokens:
        if "@" in tok and tok.split("@", 1)[0] not in ("", "eager", "kiln"):
            # NOTE: "kiln:inductor@reduce-overhead", "torch.compile@reduce-overhead": a mode column.
            base, mode = tok.split("@", 1)
            (c,) = parse(base, device)[0]
            out.append(Compiler(tok, c.kind, c.backend, mode))
            continue
        if tok == "eager":
            out.append(Compiler("eager", "eager"))
        elif tok in ("torch.compile", "inductor", "torch"):
            out.append(Compiler("torch.compile", "torch", "inductor"))
        elif tok.startswith("torch.compile:"):
            out.append(Compiler(tok, "torch", tok.split(":", 1)[1]))
        elif tok == "kiln":
            names, note = kiln_backends(device)
            if note:
                notes.append(note)
            out.extend(Compiler(f"kiln:{n}", "kiln", n) for n in names)
        elif tok.startswith("kiln:"):
            out.append(Compiler(tok, "kiln", tok.split(":", 1)[1]))
        elif tok.startswith("kiln+ca:"):
            out.append(Compiler(tok, "kiln_ca", tok.split(":", 1)[1]))
        else:
            raise SystemExit(f"unknown backend {tok!r}: use eager, torch.compile[:backend], kiln, kiln:<backend> "
                             f"or kiln+ca:<backend>")
    seen: set[str] = set()
    uniq = [c for c in out if not (c.name in seen or seen.add(c.name))]
    if not any(c.kind == "eager" for c in uniq):
        notes.append("eager not selected: speedups are left empty (eager is still run once as the reference for matching)")
    return uniq, notes


def by_name(name: str, device: str) -> Compiler:
    """The compiler for one exact name such as ``kiln:inductor`` (used by the compile-time subprocess)."""
    return parse(name, device)[0][0]


def graph_stats(c: Compiler, model: Callable[..., Any], inputs: tuple[Any, ...], train: bool) -> dict[str, Any]:
    """Graph count and graph-break count for ``c`` on ``model(*inputs)`` (kiln only; torch uses counters)."""
    if c.kind not in ("kiln", "kiln_ca"):
        return {}
    kiln = importlib.import_module("kiln")
    explain = getattr(kiln, "explain")
    with torch.set_grad_enabled(train):
        out = explain(model)(*inputs)
    stats = {"graphs": int(out.graph_count), "breaks": int(out.graph_break_count)}
    eager = [str(w)[:300] for w in getattr(out, "eager_frames", [])[:3]]
    if eager:
        stats["eager_frames"] = eager  # NOTE: functions kiln could not capture and ran uncompiled
    return stats


class DynamoCounters:
    """Reads torch.compile's graph and break counts around a first call (dynamo's global counters)."""

    def __enter__(self) -> "DynamoCounters":
        from torch._dynamo.utils import counters

        self._counters = counters
        counters.clear()
        self.stats: dict[str, Any] = {}
        return self

    def __exit__(self, *exc: Any) -> None:
        c = self._counters
        self.stats = {
            "graphs": int(c["stats"].get("unique_graphs", 0)),
            "breaks": int(sum(c["graph_break"].values())),
            "break_reasons": sorted(c["graph_break"])[:5],
        }
