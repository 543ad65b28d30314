"""AOTOptions: every option of one AOT compilation, as one record.

In:  the keyword arguments of ``aot_function`` / ``aot_module`` /
     ``aot_module_simplified`` / ``kiln.backends.aot_autograd`` (PyTorch's names).
Out: a frozen ``AOTOptions`` with defaults resolved (``bw_compiler`` and
     ``inference_compiler`` default to ``fw_compiler``, ``partition_fn`` to
     ``default_partition``), threaded unchanged through ``compile_flat``.

An option kiln does not know is an error naming it and listing the valid ones,
so a misspelled ``partiton_fn=`` never silently compiles with the default.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, Optional

from kiln import exc


@dataclasses.dataclass(frozen=True)
class AOTOptions:
    """How to compile: the compilers, the partitioner and what to trace with.

    fw_compiler / bw_compiler / inference_compiler: ``(gm, example_inputs) -> callable``
        for the forward, backward and inference (no-grad) graphs.
    partition_fn: splits the joint graph: ``(joint, inputs, *, num_fwd_outputs) -> (fw, bw)``.
    decompositions: ``{OpOverload: fn}`` applied while tracing.
    keep_inference_input_mutations: the inference graph writes mutated inputs itself
        (``aten.copy_`` at its end) instead of returning new values for the runtime to copy.
    num_params_buffers: the first N tensor inputs are parameters and buffers: recorded on
        the compiled graphs as ``gm.meta["static_input_indices"]`` (as PyTorch marks
        them for CUDA graphs and static shapes).
    dynamic: symbolic sizes.  Only False: pass fake tensors with symbolic sizes, or use
        ``kiln.compile(dynamic=True)``, for dynamic shapes.
    """

    fw_compiler: Callable
    bw_compiler: Optional[Callable] = None
    inference_compiler: Optional[Callable] = None
    partition_fn: Optional[Callable] = None
    decompositions: Optional[dict] = None
    keep_inference_input_mutations: bool = False
    num_params_buffers: int = 0
    dynamic: bool = False

    def __post_init__(self) -> None:
        # NOTE: imported here: partition.py is a sibling module of this stage that
        # imports tracing/; options must stay importable on their own.
        from kiln.aot.partition import default_partition

        if self.fw_compiler is None or not callable(self.fw_compiler):
            raise exc.KilnError(
                f"fw_compiler must be callable, got {type(self.fw_compiler).__name__}",
                why="AOT autograd needs a compiler for the forward graph",
                where=exc.user_location(),
                hint="pass e.g. fw_compiler=kiln.aot.nop",
            )
        for name in ("bw_compiler", "inference_compiler", "partition_fn"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise exc.KilnError(f"{name} must be callable or None, got {type(value).__name__}",
                                    where=exc.user_location())
        set_ = object.__setattr__
        # NOTE: remembered so that replace(fw_compiler=...) re-derives these defaults.
        set_(self, "_defaulted", frozenset(
            k for k in ("bw_compiler", "inference_compiler", "partition_fn") if getattr(self, k) is None))
        set_(self, "bw_compiler", self.bw_compiler or self.fw_compiler)
        set_(self, "inference_compiler", self.inference_compiler or self.fw_compiler)
        set_(self, "partition_fn", self.partition_fn or default_partition)
        if self.decompositions is not None and not isinstance(self.decompositions, dict):
            set_(self, "decompositions", dict(self.decompositions))
        if not isinstance(self.num_params_buffers, int) or self.num_params_buffers < 0:
            raise exc.KilnError(
                f"num_params_buffers must be an int >= 0, got {self.num_params_buffers!r}",
                why="it counts the leading inputs that are parameters or buffers",
                where=exc.user_location(),
            )
        if self.dynamic:
            raise exc.KilnError(
                "aot_function(dynamic=True) is not supported",
                why="kiln.aot traces the sizes it is given: real tensors give static sizes",
                where=exc.user_location(),
                hint="pass fake tensors with symbolic sizes (aot_module_simplified), or use "
                     "kiln.compile(fn, dynamic=True), which makes sizes symbolic before AOT",
            )

    def replace(self, **changes: Any) -> "AOTOptions":
        """A copy with ``changes`` (checked like the constructor's arguments)."""
        check_option_names(changes, "AOTOptions.replace")
        reset = {k: None for k in self._defaulted if k not in changes}
        return dataclasses.replace(self, **reset, **changes)


OPTION_NAMES: tuple = tuple(f.name for f in dataclasses.fields(AOTOptions))


def check_option_names(kwargs: dict, where: str) -> None:
    """Raise TypeError for keyword arguments that are not AOT options."""
    unknown = [k for k in kwargs if k not in OPTION_NAMES]
    if not unknown:
        return
    hints = []
    for k in unknown:
        close = difflib.get_close_matches(k, OPTION_NAMES, n=1)
        hints.append(f"{k!r} (did you mean {close[0]!r}?)" if close else repr(k))
    raise TypeError(f"{where}() got unknown option{'s' if len(unknown) > 1 else ''} "
                    f"{', '.join(hints)}; valid options: {', '.join(OPTION_NAMES)}")


def make_options(where: str, **kwargs: Any) -> AOTOptions:
    """``AOTOptions(**kwargs)``, with unknown names reported as ``where()``'s error.

    An ``options=AOTOptions(...)`` keyword is taken as is (other keywords then replace
    its fields)."""
    base = kwargs.pop("options", None)
    check_option_names(kwargs, where)
    if base is not None:
        if not isinstance(base, AOTOptions):
            raise TypeError(f"{where}(options=...) takes an AOTOptions, got {type(base).__name__}")
        return base.replace(**kwargs) if kwargs else base
    if "fw_compiler" not in kwargs:
        raise TypeError(f"{where}() missing the fw_compiler option")
    return AOTOptions(**kwargs)


__all__ = ["AOTOptions", "OPTION_NAMES", "make_options", "check_option_names"]
