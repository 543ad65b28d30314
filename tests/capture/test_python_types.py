"""Capture of Python's own types and modules: sets, dicts and their views, collections,
named tuples, itertools, functools, operator, enum, dataclasses, str, math, sys.

Each test compares compiled with eager values, and checks that the code stays in one
graph under ``fullgraph=True`` (PyTorch's capture gets one graph for all of these), or
that changing what was captured recompiles.
"""
from __future__ import annotations

import collections
import dataclasses
import enum
import functools
import itertools
import math
import operator
import sys
import typing

import pytest
import torch

import kiln
from kiln.exc import Unsupported
from kiln.testing import CompileCounter


@pytest.fixture(autouse=True)
def _reset():
    kiln.reset()
    yield


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.allclose(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return type(a) is type(b) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (set, frozenset)):
        return type(a) is type(b) and a == b
    return type(a) is type(b) and a == b


def full(fn, *args, ops=None):
    """Run ``fn`` eagerly and compiled with fullgraph=True: equal results, one graph."""
    cc = CompileCounter()
    expected = fn(*args)
    got = kiln.compile(fn, backend=cc, fullgraph=True)(*args)
    assert same(expected, got), (expected, got)
    assert cc.frame_count == 1, cc.frame_count
    if ops is not None:
        assert cc.op_count == ops, cc.op_count
    return got


X = torch.randn(4, 3)
Y = torch.randn(4, 3)


# ---------------------------------------------------------------- sets
def test_set_build_methods_and_operators():
    def f(x, y):
        s = set()
        s.add(1)
        s.add(2)
        s.add(1)
        s.add(True)  # equal to 1: no new member
        s |= {3, 4}
        s.discard(4)
        s.discard("absent")
        t = {i % 3 for i in range(10)}
        u = frozenset([1, 2]) & t
        return x * len(s), 2 in s, sorted(s - {1}), sorted(s ^ t), u, s.issuperset(u), s.isdisjoint({9})

    full(f, X, Y)


def test_set_of_tensors_is_keyed_by_identity():
    def f(x, y):
        s = {x, y, x}
        s.add(y)
        n = len(s)
        a = s.pop()
        b = s.pop()
        return a * b + n, x in {x}, len(s)

    full(f, X, Y)


def test_set_remove_missing_member_breaks():
    def f(x):
        s = {1}
        s.remove(2)
        return x

    with pytest.raises(Unsupported, match="set.remove"):
        kiln.compile(f, backend="eager", fullgraph=True)(X)


FUNCS = frozenset([torch.add, torch.sub])


def test_frozenset_of_torch_functions_and_input_set_guards():
    def f(x, fn, flags):
        if fn in FUNCS:
            x = fn(x, 1.0)
        if "double" in flags:
            x = x * 2
        return x

    cc = CompileCounter()
    opt = kiln.compile(f, backend=cc)
    for fn, flags in [(torch.add, {"double"}), (torch.add, {"double"}), (torch.mul, {"double"}),
                      (torch.add, {"other"})]:
        assert same(f(X, fn, set(flags)), opt(X, fn, set(flags)))
    # a new function and a change of the set's contents recompile; the repeat does not
    assert cc.frame_count == 3


def test_mutation_of_input_set_is_replayed():
    def f(x, s):
        s.add("seen")
        s.discard("old")
        return x + len(s)

    s_eager, s_comp = {"old", "a"}, {"old", "a"}
    out = kiln.compile(f, backend="eager", fullgraph=True)(X, s_comp)
    assert same(f(X, s_eager), out) and s_eager == s_comp == {"a", "seen"}


# ---------------------------------------------------------------- dicts
def test_dict_methods_and_views():
    def f(x, y):
        d = {"a": x}
        d.update(b=y)
        d.update([("c", x)])
        e = d.copy()
        g = dict.fromkeys(["p", "q"], 0)
        d.setdefault("z", y)
        missing = d.pop("nope", None)
        k, last = d.popitem()
        keys = d.keys()
        d["late"] = 1  # views are live
        merged = {**d, "w": 1} | {"v": 2}
        return (e["b"] + 1, g, missing, k, last * 2, list(keys), "late" in keys, len(d.values()),
                [kk for kk, _ in d.items()], merged["w"] + merged["v"])

    full(f, X, Y)


def test_dict_key_views_are_set_like():
    def f(a, b):
        total = torch.zeros(3)
        for k in sorted(a.keys() | b.keys()):
            if k in a:
                total = total + a[k]
            if k in b:
                total = total + b[k]
        return total, sorted(a.keys() & b.keys()), sorted(a.keys() - b.keys())

    v1, v2 = torch.randn(3), torch.randn(3)
    full(f, {"a": v1, "b": v2}, {"b": v1, "c": v2})


class Color(enum.Enum):
    RED = 1
    BLUE = 2

    def doubled(self):
        return self.value * 2


def test_dict_keys_that_are_not_constants():
    lin_a, lin_b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)

    def f(x, mods, by_tensor):
        d = {Color.RED: x, Color.BLUE: 2, lin_a: lin_b}
        return d[Color.RED] * d[Color.BLUE], mods[lin_a](x), by_tensor[x] + 1, Color.BLUE.doubled()

    full(f, X, {lin_a: lin_b, 3: lin_a}, {X: Y, 1: X})


def test_input_dict_key_order_and_identity_are_guarded():
    k1, k2 = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

    def f(d, x):
        return d[k1](x)

    cc = CompileCounter()
    opt = kiln.compile(f, backend=cc)
    x = torch.randn(2, 2)
    d1 = {k1: k2, 3: k1}
    assert same(f(d1, x), opt(d1, x))
    opt(d1, x)
    assert cc.frame_count == 1
    d2 = {3: k1, k1: k2}  # same keys, other order
    assert same(f(d2, x), opt(d2, x))
    assert cc.frame_count == 2


def test_mutation_of_input_dict_is_replayed():
    def f(x, d):
        d.pop("drop")
        d.setdefault("new", x + 1)
        return x * 2

    d_eager, d_comp = {"keep": 1, "drop": 2}, {"keep": 1, "drop": 2}
    out = kiln.compile(f, backend="eager", fullgraph=True)(X, d_comp)
    assert same(f(X, d_eager), out) and list(d_comp) == ["keep", "new"] and same(d_eager["new"], d_comp["new"])


# ---------------------------------------------------------------- collections
def test_ordered_dict_defaultdict_counter():
    def f(x, y):
        od = collections.OrderedDict()
        od["b"] = x
        od["a"] = y
        od.move_to_end("b")
        first, _ = od.popitem(last=False)
        dd = collections.defaultdict(list)
        dd["a"].append(x)
        dd["a"].append(y)
        dd["b"].append(y)
        c = collections.Counter("abracadabra")
        return list(od.keys()), first, sum(dd["a"]), len(dd), x * c["a"] + c["zzz"], c.most_common(2), dd

    out = full(f, X, Y)
    assert type(out[-1]) is collections.defaultdict and out[-1].default_factory is list


def test_deque_built_in_region_and_input_deque_mutation():
    def f(x, y, q):
        d = collections.deque([x, y], maxlen=3)
        d.appendleft(y)
        d.append(x)  # maxlen: drops the leftmost
        a = q.popleft()
        q.append(a)
        return d.popleft() + d.pop(), len(d), d.maxlen, q[0] * 2

    q_eager = collections.deque(["s", X, Y])
    q_comp = collections.deque(["s", X, Y])
    out = kiln.compile(f, backend="eager", fullgraph=True)(X, Y, q_comp)
    assert same(f(X, Y, q_eager), out)
    assert list(q_comp)[2] == "s" and q_comp[0] is X and len(q_comp) == 3


def test_chainmap_is_a_graph_break_with_a_reason():
    def f(x):
        return collections.ChainMap({"a": 1})["a"] + x

    with pytest.raises(Unsupported, match="ChainMap"):
        kiln.compile(f, backend="eager", fullgraph=True)(X)


Pt = collections.namedtuple("Pt", ["x", "y"], defaults=[None])


class Pair(typing.NamedTuple):
    a: torch.Tensor
    b: int = 2

    def scaled(self):
        return self.a * self.b


def test_namedtuples_built_read_and_returned():
    def f(x, y):
        p = Pt(x, y)
        q = p._replace(x=y)
        r = Pt(x)
        s = Pair(x)
        return (p.x + q.x, p[1], Pt(*p), p._asdict()["y"], r.y is None, s.scaled(), p._fields,
                p.__class__(*p), len(p))

    out = full(f, X, Y)
    assert type(out[2]) is Pt and type(out[7]) is Pt


def test_namedtuple_input_is_guarded_by_type():
    def f(p):
        a, b = p
        return a + b + p[1], p._fields

    cc = CompileCounter()
    opt = kiln.compile(f, backend=cc)
    assert same(f(Pt(X, Y)), opt(Pt(X, Y)))
    assert same(f(Pair(X, 3)), opt(Pair(X, 3)))
    assert cc.frame_count == 2


# ---------------------------------------------------------------- itertools / functools / operator
def test_itertools_table():
    def f(x, y):
        out = [a + b for a, b in itertools.product([x, y], [1, 2])]
        out += list(itertools.chain([x], [y], ()))
        out += list(itertools.chain.from_iterable([[x], [y]]))
        out += [a * b for a, b in itertools.combinations([x, y, x], 2)]
        out += [a - b for a, b in itertools.permutations([x, y])]
        out += [i * x for i, _ in zip(itertools.count(1), range(3))]
        out += list(itertools.accumulate([x, y, x]))
        out += list(itertools.accumulate([x, y], operator.mul, initial=y))
        out += list(itertools.islice([x, y, x, y], 1, None, 2))
        out += list(itertools.islice(itertools.cycle([x, y]), 3))
        out += [a - b for a, b in itertools.pairwise([x, y, x])]
        out += list(itertools.repeat(x, 2))
        out += [b for a, b in itertools.zip_longest([x], [y, y]) if a is None]
        out += list(itertools.compress([x, y, x], [1, 0, 1]))
        out += [len(list(g)) * x for _, g in itertools.groupby([1, 1, 2, 3, 3, 3])]
        out += list(itertools.starmap(torch.add, [(x, y)]))
        out += list(itertools.takewhile(lambda t: t is not y, [x, x, y, x]))
        return out

    full(f, X, Y)


@functools.lru_cache(None)
def _cached_scale(n):
    return n * 2


def test_functools_reduce_lru_cache_wraps_partial():
    def deco(fn):
        @functools.wraps(fn)
        def inner(t):
            return fn(t) + 1

        return inner

    def base(t):
        return t * 3

    def f(x, y):
        z = functools.reduce(operator.add, [x, y, x])
        w = functools.reduce(lambda a, b: a * b, [1, 2, 3], 1)
        wrapped = deco(base)
        p = functools.partial(torch.add, alpha=2)
        return z * w + _cached_scale(3), wrapped(x), wrapped.__name__, wrapped.__wrapped__ is base, p(x, y)

    full(f, X, Y)


def test_operator_getters():
    def f(x, y):
        g = operator.itemgetter(1)
        g2 = operator.itemgetter(0, 2)
        a = operator.attrgetter("shape", "dtype")
        m = operator.methodcaller("sum", 0)
        return g([x, y]) + 1, g2((x, y, x)), a(x), m(x)

    full(f, X, Y)


# ---------------------------------------------------------------- enum / dataclasses / str / math / sys
@dataclasses.dataclass
class Config:
    scale: float
    bias: torch.Tensor = None


def test_enum_members_are_constants():
    def f(x, c):
        if c is Color.RED:
            x = x + c.value
        return x * Color(2).value, c.name, Color.BLUE in (Color.BLUE,), {Color.RED: 1}[c]

    cc = CompileCounter()
    opt = kiln.compile(f, backend=cc)
    assert same(f(X, Color.RED), opt(X, Color.RED))
    assert cc.frame_count == 1


def test_dataclasses_fields_replace_and_hasattr_guard():
    def f(x, cfg):
        names = [fl.name for fl in dataclasses.fields(cfg)]
        new = dataclasses.replace(cfg, scale=3.0)
        out = x * new.scale + (cfg.bias if cfg.bias is not None else 0)
        if hasattr(cfg, "extra"):
            out = out - 100
        return out, names, dataclasses.is_dataclass(cfg), dataclasses.asdict(Config(1.0))

    cfg = Config(2.0, torch.ones(3))
    cc = CompileCounter()
    opt = kiln.compile(f, backend=cc)
    assert same(f(X, cfg), opt(X, cfg))
    cfg.extra = True  # hasattr was False: must recompile
    assert same(f(X, cfg), opt(X, cfg))
    assert cc.frame_count == 2


def test_str_methods_fstrings_math_and_sys():
    def f(x):
        tag = f"{x.shape[0]}-{'ab'.upper()}-{x.dtype}".split("-")
        scale = math.sqrt(4) + math.pi + math.floor(2.5) + math.log2(8)
        py = sys.version_info >= (3, 8) and sys.maxsize > 2**31
        return x * scale + len(tag), "_".join(tag), "abc".startswith("a"), py, sys.platform == sys.platform

    full(f, X)


# ---------------------------------------------------------------- lists, tuples, generators
def test_list_and_tuple_methods():
    def f(x, y):
        lst = [3, 1, 2]
        lst.sort(key=lambda v: -v)
        ts = sorted([y, x], key=lambda t: 0)  # stable: keeps order
        l2 = [x, y]
        l2.remove(x)
        seq = 2 * (x.shape[0], 3) * 2
        return lst, ts, l2, [1, 2].copy(), [1, 2, 3].index(2), (1, 2, 1).count(1), x + seq[4], (x, y).__class__([x])

    full(f, X, Y)


def test_list_search_that_compares_tensors_breaks():
    def f(x, y):
        return [x, y].index(y)  # eager compares x == y first

    with pytest.raises(Unsupported, match="comparing a tensor"):
        kiln.compile(f, backend="eager", fullgraph=True)(X, Y)


def test_yield_from_and_module_parameters_in_one_graph():
    mod = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU(), torch.nn.Linear(3, 3))

    def gen(xs):
        seen = set()
        for v in xs:
            if v not in seen:
                seen.add(v)
                yield v
        return len(seen)

    def outer(xs):
        n = yield from gen(xs)
        yield n

    def f(x):
        total = sum(p.sum() for p in mod.parameters())
        return x + total + len(list(mod.modules())), list(outer([1, 2, 1]))

    full(f, X)


def test_typing_subscripts_in_annotations():
    T = typing.TypeVar("T")

    def f(x):
        def apply(c: typing.Callable[[T], T], y: T) -> typing.List[T]:
            return [c(y)]

        return apply(torch.sin, x)

    full(f, X)


class _Bag:
    def __init__(self, items, flag):
        self.items = items
        self.flag = flag

    def __iter__(self):
        return iter(self.items)

    def __bool__(self):
        return self.flag > 0


class _Sized:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def test_user_objects_truth_and_iteration_use_their_methods():
    def f(x, bag, sized):
        out = [t + 1 for t in bag]
        if bag:
            out.append(x * 2)
        if not sized:
            out.append(x - 1)
        return out

    cc = CompileCounter()
    opt = kiln.compile(f, backend=cc, fullgraph=True)
    for bag, sized in [(_Bag([X, Y], 1), _Sized(0)), (_Bag([X], -1), _Sized(2))]:
        assert same(f(X, bag, sized), opt(X, bag, sized))


def test_python_scalar_types_as_dtypes_and_function_annotations():
    def f(x):
        def inner(t: torch.Tensor, n: int = 2) -> torch.Tensor:
            return t * n

        return (x * 5).to(bool).to(float).to(int) + 8, inner(x), inner.__annotations__["n"] is int

    full(f, X)


def test_endless_itertools_iterator_survives_a_graph_break():
    def f(x):
        it = itertools.count(5, 2)
        first = next(it)
        kiln.graph_break()
        return x + next(it) + first

    cc = CompileCounter()
    assert same(f(X), kiln.compile(f, backend=cc)(X))
    assert cc.frame_count == 1  # the part after the break; nothing ran eagerly by fallback
