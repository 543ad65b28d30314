"""Common-subexpression hoisting for generated guard functions.

Guards over a module's parameters repeat long access chains
(``self._modules['blocks']._modules['0']._parameters['weight']``) once per
check: six checks per tensor.  This pass counts, over the guard records'
sources and the graph call's arguments, how often each node of each source
tree is read; a hoistable node (an attribute / constant-subscript step) read
more than once is bound to a local at its first evaluation
(``(___b3 := self._modules['blocks'])``) and read from the local afterwards, in
the guard and in the graph call that runs once the guard has passed.

NOTE: a binding is placed only where it is certainly evaluated before every
later use: guard tests are ``and`` chains of expressions evaluated left to right
(guards.Guard says so), the guards are joined with ``and``, and the graph call
runs only if all held.  Shape guards are kept as text and never bound into.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable, Optional

from .guards import Guard
from .sources import Source


def repeated_sources(tests: Iterable[tuple], extra: Iterable[Source] = ()) -> set[Source]:
    """Hoistable source nodes that ``tests`` (fragment tuples) and ``extra`` read more than once."""
    counts: Counter = Counter()
    for test in list(tests) + [(s,) for s in extra]:
        for f in test:
            if isinstance(f, Source):
                counts.update(f.chain())
    return {s for s, c in counts.items() if c > 1 and s.hoistable}


class Hoister:
    """Renders sources, binding each repeated node at its first rendering."""

    def __init__(self, repeated: set[Source]):
        self.repeated = repeated
        self.bound: dict[Source, str] = {}

    def bind(self, src: Source) -> str:
        """Code of ``src`` inside the guard (may bind)."""
        name = self.bound.get(src)
        if name is not None:
            return name
        text = src.render_with(self.bind)
        if src in self.repeated:
            name = f"___b{len(self.bound)}"
            self.bound[src] = name
            return f"({name} := {text})"
        return text

    def read(self, src: Source) -> str:
        """Code of ``src`` after the guard held (reads bound locals, binds nothing)."""
        name = self.bound.get(src)
        return name if name is not None else src.render_with(self.read)


def hoist_guard(guards: list[Guard], graph_args: Optional[list[Source]]) -> tuple[str, Optional[str]]:
    """(fast-path guard expression, graph call argument list) with repeated chains read once."""
    hoister = Hoister(repeated_sources([g.fast_test() for g in guards], graph_args or ()))
    guard = " and ".join(f"({g.code(hoister.bind)})" for g in guards) or "True"
    args = None if graph_args is None else ", ".join(hoister.read(s) for s in graph_args)
    return guard, args


__all__ = ["hoist_guard", "repeated_sources", "Hoister"]
