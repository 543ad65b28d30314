"""What Python a model really runs: a census of one eager call, for the capture stage.

Run ``python tests/models/census.py [name ...] [--json PATH]``. In: model names from
``zoo.BUILDERS`` (default: all). Out: per model, the Python features its forward runs
(found from the executed bytecode, not by guessing), the opcodes executed, the C
functions called (builtins, torch functions, Tensor methods) and the Python functions
run, grouped by file. Uses ``sys.settrace`` with per-opcode events and
``sys.setprofile`` for C calls, around one call of the model in eager mode (the
training step: one whole ``train_step``).
"""
from __future__ import annotations

import argparse
import collections
import dis
import inspect
import json
import os
import sys
import sysconfig
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import zoo  # noqa: E402

CO_GENERATOR = inspect.CO_GENERATOR

# feature name -> predicate over (opcode names executed, C functions called, python functions run)
_OPS = {
    "**kwargs / *args calls (CALL_FUNCTION_EX, DICT_MERGE)": {"CALL_FUNCTION_EX", "DICT_MERGE", "DICT_UPDATE"},
    "with / context managers (BEFORE_WITH)": {"BEFORE_WITH"},
    "try/except/finally (PUSH_EXC_INFO, CHECK_EXC_MATCH, RERAISE)": {"PUSH_EXC_INFO", "CHECK_EXC_MATCH", "RERAISE"},
    "f-strings (FORMAT_VALUE, BUILD_STRING)": {"FORMAT_VALUE", "BUILD_STRING", "FORMAT_SIMPLE", "FORMAT_WITH_SPEC"},
    "generators / yield (YIELD_VALUE, RETURN_GENERATOR)": {"YIELD_VALUE", "RETURN_GENERATOR"},
    "closures / nested functions (MAKE_FUNCTION, LOAD_DEREF)": {"MAKE_FUNCTION", "LOAD_DEREF", "LOAD_CLOSURE"},
    "star unpacking (UNPACK_EX, LIST_EXTEND)": {"UNPACK_EX", "LIST_EXTEND"},
    "slicing (BUILD_SLICE, BINARY_SLICE)": {"BUILD_SLICE", "BINARY_SLICE", "STORE_SLICE"},
    "dict/set literals (BUILD_MAP, BUILD_CONST_KEY_MAP, BUILD_SET)": {"BUILD_MAP", "BUILD_CONST_KEY_MAP", "BUILD_SET"},
    "super() (LOAD_GLOBAL super / LOAD_SUPER_ATTR)": {"LOAD_SUPER_ATTR"},
    "assert (LOAD_ASSERTION_ERROR)": {"LOAD_ASSERTION_ERROR"},
    "in-place operators (BINARY_OP +=)": set(),
}
_CFUNCS = {
    "isinstance / issubclass": ("builtins.isinstance", "builtins.issubclass"),
    "getattr / hasattr / setattr": ("builtins.getattr", "builtins.hasattr", "builtins.setattr"),
    "math module": ("math.",),
    "warnings": ("warnings.", "_warnings."),
    "functools.partial objects": ("functools.partial",),
    "dict methods (get, items, pop, update, ...)": ("dict.",),
    "str methods (startswith, format, join, ...)": ("str.",),
    "list/tuple methods": ("list.", "tuple."),
    "torch.nn.functional (C: torch._C._nn / torch.*)": ("torch._C._nn.",),
    "autograd backward (Tensor.backward -> torch.autograd)": ("torch._C._EngineBase.run_backward",),
    "grad-mode switching (torch._C._set_grad_enabled)": ("torch._C._set_grad_enabled",),
}


_STDLIB = sysconfig.get_paths()["stdlib"] + os.sep


# opcodes whose every executed site is listed (what a capture stage is likeliest to lack)
RARE_OPS = {"PUSH_EXC_INFO", "CHECK_EXC_MATCH", "RERAISE", "RAISE_VARARGS", "BEFORE_WITH", "YIELD_VALUE",
            "RETURN_GENERATOR", "CALL_FUNCTION_EX", "DICT_MERGE", "UNPACK_EX", "IMPORT_NAME", "IMPORT_FROM",
            "LOAD_SUPER_ATTR", "FORMAT_VALUE", "BUILD_STRING", "SET_ADD", "MAP_ADD", "DELETE_FAST",
            "DELETE_SUBSCR", "STORE_GLOBAL", "STORE_DEREF", "LOAD_ASSERTION_ERROR", "MATCH_CLASS", "SETUP_ANNOTATIONS"}


def _short(path: str) -> str:
    marker = "site-packages" + os.sep
    if marker in path:
        return path.split(marker, 1)[1]
    if path.startswith(_STDLIB):
        return "stdlib/" + path[len(_STDLIB):]
    return os.path.relpath(path) if os.path.isabs(path) else path


def _cname(fn: Any) -> str:
    self = getattr(fn, "__self__", None)
    name = getattr(fn, "__name__", repr(fn))
    if self is not None and not isinstance(self, type(sys)):
        owner = self if isinstance(self, type) else type(self)
        if owner.__name__ == "TensorBase" or issubclass(owner, torch.Tensor) or owner.__name__ == "_TensorBase":
            return f"Tensor.{name}"
        return f"{owner.__qualname__}.{name}"
    mod = getattr(fn, "__module__", None) or (self.__name__ if self is not None else "?")
    return f"{mod}.{name}"


class Census:
    """Records executed opcodes, Python functions and C calls while active."""

    def __init__(self) -> None:
        self.opcodes: collections.Counter = collections.Counter()
        self.pyfuncs: collections.Counter = collections.Counter()
        self.cfuncs: collections.Counter = collections.Counter()
        self.generators: set[str] = set()
        self.properties: set[str] = set()
        self.dataclasses: set[str] = set()
        self.enums: set[str] = set()
        self.rare_sites: collections.defaultdict = collections.defaultdict(set)

    def _trace(self, frame, event, arg):
        code = frame.f_code
        if event == "call":
            frame.f_trace_opcodes = True
            where = f"{_short(code.co_filename)}:{code.co_qualname}"
            self.pyfuncs[where] += 1
            if code.co_flags & CO_GENERATOR:
                self.generators.add(where)
            self._classify(frame, where)
            return self._trace
        if event == "opcode":
            op = dis.opname[code.co_code[frame.f_lasti]]
            self.opcodes[op] += 1
            if op in RARE_OPS:
                self.rare_sites[op].add(f"{_short(code.co_filename)}:{frame.f_lineno} {code.co_qualname}")
        return self._trace

    def _classify(self, frame, where: str) -> None:
        code = frame.f_code
        self_obj = frame.f_locals.get("self")
        if self_obj is not None:
            cls = type(self_obj)
            attr = inspect.getattr_static(cls, code.co_name, None)
            if isinstance(attr, property) and getattr(attr.fget, "__code__", None) is code:
                self.properties.add(f"{cls.__name__}.{code.co_name}")
            if code.co_name == "__init__" and "__dataclass_fields__" in cls.__dict__:
                self.dataclasses.add(cls.__qualname__)
            if code.co_name == "__post_init__":
                self.dataclasses.add(cls.__qualname__)
        if "enum.py" in code.co_filename:
            self.enums.add(code.co_qualname)

    def _profile(self, frame, event, arg):
        if event == "c_call":
            self.cfuncs[_cname(arg)] += 1

    def __enter__(self) -> "Census":
        # NOTE: on 3.12 opcode events stayed off for a whole first model unless the
        # calling frame asks for them too before tracing starts.
        caller = sys._getframe(1)
        caller.f_trace_opcodes = True
        sys.setprofile(self._profile)
        sys.settrace(self._trace)
        caller.f_trace = self._trace
        return self

    def __exit__(self, *exc) -> None:
        sys.settrace(None)
        sys.setprofile(None)

    def features(self) -> list[str]:
        ops = set(self.opcodes)
        out = [name for name, want in _OPS.items() if want & ops]
        if any("<listcomp>" in f or "<dictcomp>" in f or "<setcomp>" in f for f in self.pyfuncs) or \
                "LIST_APPEND" in ops or "MAP_ADD" in ops:
            out.append("comprehensions (list/dict/set)")
        if any("<genexpr>" in f for f in self.pyfuncs):
            out.append("generator expressions (<genexpr>)")
        if any(c in self.cfuncs for c in ("builtins.super", "super.__init__")) or "LOAD_SUPER_ATTR" in ops:
            out.append("super()")
        for name, prefixes in _CFUNCS.items():
            if any(c.startswith(p) for c in self.cfuncs for p in prefixes):
                out.append(name)
        if self.properties:
            out.append(f"properties ({len(self.properties)})")
        if self.dataclasses:
            out.append(f"dataclass objects: {', '.join(sorted(self.dataclasses))}")
        if self.enums:
            out.append("enums")
        return out


def run(name: str) -> Census:
    model, inputs, kind = zoo.build(name)
    fn = zoo.train_step if kind == "train" else model
    fn(*inputs)  # first call outside: lazy inits (rotary caches, ...) are not counted
    model, inputs, _ = zoo.build(name)
    fn = zoo.train_step if kind == "train" else model
    with Census() as c:
        fn(*inputs)
    return c


def report(name: str, c: Census, top: int) -> str:
    files = collections.Counter()
    for where, n in c.pyfuncs.items():
        files[where.split(":")[0]] += n
    lines = [f"## {name}", "features: " + "; ".join(c.features()),
             f"opcodes ({len(c.opcodes)}): " + " ".join(sorted(c.opcodes)),
             f"C calls ({len(c.cfuncs)} distinct), top {top}: " +
             ", ".join(f"{k}x{v}" for k, v in c.cfuncs.most_common(top)),
             "python files: " + ", ".join(f"{k} ({v})" for k, v in files.most_common()),
             "properties: " + ", ".join(sorted(c.properties)),
             "generators: " + ", ".join(sorted(c.generators))]
    for op in sorted(c.rare_sites):
        lines.append(f"  {op}: " + "; ".join(sorted(c.rare_sites[op])))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", default=list(zoo.BUILDERS))
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--json", help="write everything recorded as JSON here")
    args = ap.parse_args()
    dump = {}
    for name in args.names:
        c = run(name)
        print(report(name, c, args.top), "\n", flush=True)
        dump[name] = {"features": c.features(), "opcodes": dict(c.opcodes), "cfuncs": dict(c.cfuncs),
                      "pyfuncs": dict(c.pyfuncs), "properties": sorted(c.properties),
                      "generators": sorted(c.generators), "dataclasses": sorted(c.dataclasses),
                      "rare_sites": {k: sorted(v) for k, v in c.rare_sites.items()}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dump, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
