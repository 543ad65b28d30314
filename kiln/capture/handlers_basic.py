"""Opcode handlers: loads, stores, stack shuffles, builders, operators."""
from __future__ import annotations

import operator

from .bytecode import compare_symbol, handles
from .variables.symbolic import SymNodeVT
from .operators import COMPARE, NB_OPS, binary_op, contains, is_same, unary_op
from .variables.base import ConstantVT, NullVT, const_vt, is_const_value, unsupported
from .variables.callables import CellVT, RealCellVT
from .variables.containers import DictVT, ListVT, SequenceVT, SliceVT, TupleVT
from .variables.list_subclass import ListSubclassVT, NewListSubclassVT
from .variables.tensor import TensorVT


def _getitem(tx, obj, key):
    if isinstance(obj, TensorVT):
        return tx.output.call_graph("call_function", operator.getitem, [obj, key], {})
    if isinstance(obj, (SequenceVT, DictVT)):
        return obj.getitem(tx, key)
    from .variables.dicts import DictViewVT
    from .variables.sets import SetVT

    if isinstance(obj, (SetVT, DictViewVT)):
        unsupported(f"{obj.python_type().__name__} object is not subscriptable", why="eager raises TypeError")
    if isinstance(obj, ConstantVT):
        return const_vt(obj.value[key.const()])
    from .variables.pylib import static_subscript

    typed = static_subscript(tx, obj, key)
    if typed is not None:
        return typed
    return obj.call_method(tx, "__getitem__", [key], {})


def _setitem(tx, obj, key, value):
    from .variables.numpy_vt import NdarrayVT, call

    if isinstance(obj, NdarrayVT):
        call(tx, "op", operator.setitem, [obj, key, value])
    elif isinstance(obj, TensorVT):
        tx.output.call_graph("call_function", operator.setitem, [obj, key, value], {})
    elif isinstance(obj, (ListVT, DictVT, ListSubclassVT, NewListSubclassVT)):
        obj.setitem(tx, key, value)
    else:
        unsupported(f"item assignment on {obj}")


class BasicHandlers:
    # ---------------------------------------------------------- no-ops
    @handles("NOP", "RESUME", "CACHE", "EXTENDED_ARG", "COPY_FREE_VARS")
    def NOP(self, inst):
        pass

    @handles("PRECALL", max_version=(3, 11))
    def PRECALL(self, inst):
        pass

    # ---------------------------------------------------------- locals
    @handles("LOAD_FAST", "LOAD_FAST_CHECK", max_version=(3, 12))
    def LOAD_FAST(self, inst):
        self._load_fast(inst.argval)

    def _load_fast(self, name):
        if name not in self.locals:
            unsupported(f"local variable '{name}' referenced before assignment")
        v = self.resolve(self.locals[name])
        self.locals[name] = v
        self.push(v)

    @handles("LOAD_FAST", "LOAD_FAST_CHECK", min_version=(3, 13))
    def LOAD_FAST_313(self, inst):
        # NOTE: 3.13 builds closures with LOAD_FAST of the cell's slot (LOAD_CLOSURE became
        # a pseudo-instruction); a cell or free variable is read by value with LOAD_DEREF.
        if inst.argval in self.code.co_cellvars or inst.argval in self.code.co_freevars:
            self.LOAD_CLOSURE(inst)
        else:
            self._load_fast(inst.argval)

    @handles("LOAD_FAST_LOAD_FAST", min_version=(3, 13))
    def LOAD_FAST_LOAD_FAST(self, inst):
        first, second = inst.argval
        self._load_fast(first)
        self._load_fast(second)

    @handles("STORE_FAST_LOAD_FAST", min_version=(3, 13))
    def STORE_FAST_LOAD_FAST(self, inst):
        store, load = inst.argval
        self._store_fast(store)
        self._load_fast(load)

    @handles("STORE_FAST_STORE_FAST", min_version=(3, 13))
    def STORE_FAST_STORE_FAST(self, inst):
        first, second = inst.argval
        self._store_fast(first)
        self._store_fast(second)

    @handles("LOAD_FAST_AND_CLEAR", min_version=(3, 12))
    def LOAD_FAST_AND_CLEAR(self, inst):
        v = self.locals.pop(inst.argval, None)
        self.push(NullVT() if v is None else self.resolve(v))

    @handles("STORE_FAST")
    def STORE_FAST(self, inst):
        self._store_fast(inst.argval)

    def _store_fast(self, name):
        v = self.pop()
        if isinstance(v, NullVT):
            self.locals.pop(name, None)
        else:
            name_hint(v, name)
            self.locals[name] = v

    @handles("DELETE_FAST")
    def DELETE_FAST(self, inst):
        self.locals.pop(inst.argval, None)

    @handles("LOAD_CONST")
    def LOAD_CONST(self, inst):
        v = inst.argval
        self.push(const_vt(v) if isinstance(v, (tuple, slice)) or is_const_value(v) else ConstantVT(v))

    @handles("RETURN_CONST", min_version=(3, 12))
    def RETURN_CONST(self, inst):
        self.on_return(const_vt(inst.argval))

    # ---------------------------------------------------------- cells
    @handles("MAKE_CELL")
    def MAKE_CELL(self, inst):
        name = inst.argval
        cell = CellVT(self.locals.pop(name, None))
        if cell.value is not None:
            cell.value = self.resolve(cell.value)
        self.cells[name] = cell

    @handles("LOAD_CLOSURE")
    def LOAD_CLOSURE(self, inst):
        cell = self.cells.get(inst.argval)
        if cell is None:
            unsupported(f"closure over unknown cell '{inst.argval}'")
        self.push(cell if isinstance(cell, CellVT) else RealCellVT(cell))

    @handles("LOAD_DEREF")
    def LOAD_DEREF(self, inst):
        self.push(self.load_deref(inst.argval))

    @handles("STORE_DEREF")
    def STORE_DEREF(self, inst):
        cell = self.cells.get(inst.argval)
        value = self.pop()
        if isinstance(cell, CellVT):
            cell.value = value
            return
        if cell is None:
            unsupported(f"write to unknown closure variable '{inst.argval}'")
        # NOTE: a real cell (of the compiled frame or of any function inlined): the write is
        # a side effect replayed after the graph, seen by every later read of that cell.
        src = self.cell_sources.get(inst.argval) or self.output.objects.source(cell)
        self.output.side_effects.store_cell(cell, _CellObj(src), value)

    # ---------------------------------------------------------- globals
    @handles("LOAD_GLOBAL", max_version=(3, 12))
    def LOAD_GLOBAL(self, inst):
        if inst.arg & 1:
            self.push(NullVT())
        self.push(self.load_global(inst.argval))

    @handles("LOAD_GLOBAL", min_version=(3, 13))
    def LOAD_GLOBAL_313(self, inst):
        # NOTE: 3.13 pushes the NULL above the global (CALL reads [callable, NULL, args]).
        self.push(self.load_global(inst.argval))
        if inst.arg & 1:
            self.push(NullVT())

    @handles("STORE_GLOBAL")
    def STORE_GLOBAL(self, inst):
        if self.f_globals is not self.output.root_globals:
            unsupported("global write in an inlined function of another module")
        from .sources import global_source

        src = global_source(self.output.objects, self.f_globals, self.output.root_globals, inst.argval)
        self.output.side_effects.store_global(src, inst.argval, self.pop())

    # ---------------------------------------------------------- stack
    @handles("POP_TOP")
    def POP_TOP(self, inst):
        self.pop()

    @handles("PUSH_NULL")
    def PUSH_NULL(self, inst):
        self.push(NullVT())

    @handles("COPY")
    def COPY(self, inst):
        self.push(self.stack[-inst.arg])

    @handles("SWAP")
    def SWAP(self, inst):
        i = inst.arg
        self.stack[-1], self.stack[-i] = self.stack[-i], self.stack[-1]

    # ---------------------------------------------------------- builders
    @handles("BUILD_TUPLE")
    def BUILD_TUPLE(self, inst):
        self.push(TupleVT(self.popn(inst.arg)))

    @handles("BUILD_LIST")
    def BUILD_LIST(self, inst):
        self.push(ListVT(self.popn(inst.arg)))

    @handles("BUILD_SET")
    def BUILD_SET(self, inst):
        from .variables.sets import SetVT

        self.push(SetVT(self.popn(inst.arg)))

    @handles("SET_ADD")
    def SET_ADD(self, inst):
        v = self.pop()
        self.stack[-inst.arg].call_method(self, "add", [v], {})

    @handles("SET_UPDATE")
    def SET_UPDATE(self, inst):
        v = self.pop()
        self.stack[-inst.arg].call_method(self, "update", [v], {})

    @handles("BUILD_MAP")
    def BUILD_MAP(self, inst):
        flat = self.popn(2 * inst.arg)
        d = DictVT({})
        for i in range(0, len(flat), 2):
            d.put(flat[i], flat[i + 1])
        self.push(d)

    @handles("BUILD_CONST_KEY_MAP")
    def BUILD_CONST_KEY_MAP(self, inst):
        keys = self.pop().const()
        vals = self.popn(inst.arg)
        self.push(DictVT(dict(zip(keys, vals))))

    @handles("BUILD_SLICE")
    def BUILD_SLICE(self, inst):
        parts = self.popn(inst.arg)
        if len(parts) == 2:
            parts.append(ConstantVT(None))
        self.push(SliceVT(*parts))

    @handles("BUILD_STRING")
    def BUILD_STRING(self, inst):
        self.push(ConstantVT("".join(p.const() for p in self.popn(inst.arg))))

    @handles("FORMAT_VALUE", max_version=(3, 12))
    def FORMAT_VALUE(self, inst):
        spec = self.pop().const() if (inst.arg & 0x04) else ""
        value = self.pop().const()
        conv = {1: str, 2: repr, 3: ascii}.get(inst.arg & 0x03)
        self.push(ConstantVT(format(conv(value) if conv else value, spec)))

    # NOTE: 3.13 split FORMAT_VALUE into CONVERT_VALUE (!s / !r / !a), FORMAT_SIMPLE and
    # FORMAT_WITH_SPEC (the spec above the value).
    @handles("CONVERT_VALUE", min_version=(3, 13))
    def CONVERT_VALUE(self, inst):
        conv = {1: str, 2: repr, 3: ascii}[inst.arg]
        self.push(ConstantVT(conv(self.pop().const())))

    @handles("FORMAT_SIMPLE", min_version=(3, 13))
    def FORMAT_SIMPLE(self, inst):
        self.push(ConstantVT(format(self.pop().const(), "")))

    @handles("FORMAT_WITH_SPEC", min_version=(3, 13))
    def FORMAT_WITH_SPEC(self, inst):
        spec = self.pop().const()
        self.push(ConstantVT(format(self.pop().const(), spec)))

    @handles("LIST_APPEND")
    def LIST_APPEND(self, inst):
        v = self.pop()
        self.stack[-inst.arg].items.append(v)

    @handles("LIST_EXTEND")
    def LIST_EXTEND(self, inst):
        v = self.pop()
        self.stack[-inst.arg].items.extend(v.unpack(self))

    @handles("DICT_UPDATE", "DICT_MERGE")
    def DICT_UPDATE(self, inst):
        v = self.pop()
        if not isinstance(v, DictVT):
            unsupported("** of a non-dict")
        target = self.stack[-inst.arg]
        for k, item in v.items.items():
            target.put(v.key_vt(k), item)

    @handles("MAP_ADD")
    def MAP_ADD(self, inst):
        value = self.pop()
        key = self.pop()
        self.stack[-inst.arg].put(key, value)

    @handles("LIST_TO_TUPLE", max_version=(3, 11))
    def LIST_TO_TUPLE(self, inst):
        self.push(TupleVT(self.pop().items))

    @handles("CALL_INTRINSIC_1", min_version=(3, 12))
    def CALL_INTRINSIC_1(self, inst):
        # NOTE: CPython 3.12 intrinsic ids: 5 UNARY_POSITIVE, 6 LIST_TO_TUPLE.
        if inst.arg == 6:
            self.push(TupleVT(self.pop().items))
        elif inst.arg == 5:
            self.push(unary_op(self, operator.pos, self.pop()))
        else:
            unsupported(f"intrinsic function {inst.arg}")

    # ---------------------------------------------------------- unpacking
    @handles("UNPACK_SEQUENCE")
    def UNPACK_SEQUENCE(self, inst):
        items = self.pop().unpack(self)
        if len(items) != inst.arg:
            unsupported("unpacking a sequence of the wrong length")
        self.stack.extend(reversed(items))

    @handles("UNPACK_EX")
    def UNPACK_EX(self, inst):
        items = self.pop().unpack(self)
        before, after = inst.arg & 0xFF, inst.arg >> 8
        if len(items) < before + after:
            unsupported("unpacking a sequence that is too short")
        mid = ListVT(items[before:len(items) - after])
        vals = items[:before] + [mid] + items[len(items) - after:]
        self.stack.extend(reversed(vals))

    # ---------------------------------------------------------- subscripts
    @handles("BINARY_SUBSCR")
    def BINARY_SUBSCR(self, inst):
        key = self.pop()
        obj = self.pop()
        self.push(_getitem(self, obj, key))

    @handles("BINARY_SLICE", min_version=(3, 12))
    def BINARY_SLICE(self, inst):
        end, start = self.pop(), self.pop()
        obj = self.pop()
        self.push(_getitem(self, obj, SliceVT(start, end, ConstantVT(None))))

    @handles("STORE_SUBSCR")
    def STORE_SUBSCR(self, inst):
        key, obj, value = self.pop(), self.pop(), self.pop()
        _setitem(self, obj, key, value)

    @handles("STORE_SLICE", min_version=(3, 12))
    def STORE_SLICE(self, inst):
        end, start, obj, value = self.pop(), self.pop(), self.pop(), self.pop()
        _setitem(self, obj, SliceVT(start, end, ConstantVT(None)), value)

    @handles("DELETE_SUBSCR")
    def DELETE_SUBSCR(self, inst):
        key, obj = self.pop(), self.pop()
        if isinstance(obj, (ListSubclassVT, NewListSubclassVT)):
            return obj.delitem(self, key)
        if not isinstance(obj, (ListVT, DictVT)):
            unsupported(f"del on {obj}")
        if isinstance(obj, ListVT):
            obj.mutate(self, "__delitem__", [key], {})
        else:
            obj.call_method(self, "pop", [key], {})

    # ---------------------------------------------------------- operators
    @handles("BINARY_OP")
    def BINARY_OP(self, inst):
        b, a = self.pop(), self.pop()
        self.push(binary_op(self, NB_OPS[inst.arg], a, b))

    @handles("COMPARE_OP", max_version=(3, 12))
    def COMPARE_OP(self, inst):
        self._compare(inst.argval)

    @handles("COMPARE_OP", min_version=(3, 13))
    def COMPARE_OP_313(self, inst):
        # NOTE: 3.13's bool flag (argval "bool(<)") converts the result for a jump; the
        # jump handlers take truthiness themselves, and a tensor result must stay a tensor
        # so that the jump, not the compare, is the graph break.
        self._compare(compare_symbol(inst))

    def _compare(self, sym):
        b, a = self.pop(), self.pop()
        op = COMPARE[sym]
        from .variables.numpy_vt import NdarrayVT

        if op in (operator.eq, operator.ne) and not isinstance(a, (TensorVT, NdarrayVT)) \
                and not isinstance(b, (TensorVT, NdarrayVT)) \
                and not hasattr(a, "binop") and not hasattr(b, "binop") \
                and not (a.is_const() and b.is_const()) \
                and not (isinstance(a, SymNodeVT) or isinstance(b, SymNodeVT)):
            same = is_same(a, b)
            self.push(ConstantVT(same if op is operator.eq else not same))
            return
        self.push(binary_op(self, op, a, b))

    @handles("IS_OP")
    def IS_OP(self, inst):
        b, a = self.pop(), self.pop()
        self.push(ConstantVT(is_same(a, b) != bool(inst.arg)))

    @handles("CONTAINS_OP")
    def CONTAINS_OP(self, inst):
        seq, item = self.pop(), self.pop()
        self.push(ConstantVT(contains(self, item, seq) != bool(inst.arg)))

    @handles("UNARY_NEGATIVE")
    def UNARY_NEGATIVE(self, inst):
        self.push(unary_op(self, operator.neg, self.pop()))

    @handles("UNARY_INVERT")
    def UNARY_INVERT(self, inst):
        self.push(unary_op(self, operator.invert, self.pop()))

    @handles("UNARY_POSITIVE", max_version=(3, 11))
    def UNARY_POSITIVE(self, inst):
        self.push(unary_op(self, operator.pos, self.pop()))

    @handles("UNARY_NOT")
    def UNARY_NOT(self, inst):
        self.push(ConstantVT(not self.pop().truthy(self)))

    @handles("TO_BOOL", min_version=(3, 13))
    def TO_BOOL(self, inst):
        # NOTE: TO_BOOL only ever precedes POP_JUMP_IF_TRUE/FALSE or UNARY_NOT, which take
        # truthiness themselves; the value stays as it is so that a tensor condition breaks
        # at the jump (both branches become resume functions).
        pass


class _CellObj:
    """A real closure cell of the compiled frame, as a side-effect target."""

    def __init__(self, source):
        self.source = source


def name_hint(v, name: str) -> None:
    """A graph tensor first stored to a local is named after it (``x = a + 1`` is node ``x``,
    a later ``x = x * 2`` node ``x_1``), as in PyTorch's capture; inputs keep their names."""
    node = getattr(v, "node", None)
    if isinstance(v, TensorVT) and node is not None and node.op in ("call_function", "call_method", "call_module") \
            and not node.meta.get("kiln_named") and name.isidentifier():
        # NOTE: ``source_fn_stack`` keeps the name the node was made with (``y = x.sum()``:
        # node ``y``, stack ``[('sum_1', 'sum')]``), as PyTorch records it when it creates a node.
        node.meta.setdefault("source_fn_stack", [(node.name, node.target)])
        node._rename(name)
        node.meta["kiln_named"] = True
