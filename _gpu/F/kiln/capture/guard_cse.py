"""Common-subexpression hoisting for generated guard functions.

Guards over a module's parameters repeat long access chains
(``self.blocks._modules['0'].attn.qkv.weight``) once per check, and every
``.blocks`` goes through ``nn.Module.__getattr__``: hundreds of Python
attribute lookups per call.  This pass binds each chain that appears more
than once to a local at its first evaluation (``(___v3 := self.blocks)``)
and reads the local afterwards, in the guard and in the body that runs once
the guard has passed.

NOTE: a binding is placed only where it is certainly evaluated before every
later use: along a chain of ``and`` (a later conjunct runs only if the
earlier ones did, and the body runs only if all did), never inside ``or``,
conditional expressions, lambdas or comprehensions.
"""
from __future__ import annotations

import ast
from collections import Counter

_UNSAFE = (ast.IfExp, ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


def _is_chain(node: ast.AST) -> bool:
    """An attribute/constant-subscript chain rooted at a name: ``a.b['c'].d``."""
    if not isinstance(node, (ast.Attribute, ast.Subscript)):
        return False
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        if isinstance(node, ast.Subscript) and not isinstance(node.slice, ast.Constant):
            return False
        node = node.value
    return isinstance(node, ast.Name)


def _count(trees: list[ast.AST]) -> Counter:
    counts: Counter = Counter()
    for tree in trees:
        for node in ast.walk(tree):
            if _is_chain(node):
                counts[ast.dump(node)] += 1
    return counts


class _Hoist(ast.NodeTransformer):
    def __init__(self, repeated: set[str], bound: dict[str, str], bind: bool):
        self.repeated = repeated
        self.bound = bound
        self.bind = bind
        self.safe = True

    def _chain(self, node: ast.AST) -> ast.AST:
        key = ast.dump(node)
        if key in self.bound:
            return ast.Name(self.bound[key], ast.Load())
        node = self.generic_visit(node)
        if key in self.repeated and self.bind and self.safe:
            name = f"___v{len(self.bound)}"
            self.bound[key] = name
            return ast.NamedExpr(ast.Name(name, ast.Store()), node)
        return node

    visit_Attribute = _chain
    visit_Subscript = _chain

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.AST:
        if isinstance(node.op, ast.And):
            return self.generic_visit(node)
        return self._unsafe(node)

    def _unsafe(self, node: ast.AST) -> ast.AST:
        saved, self.safe = self.safe, False
        try:
            return self.generic_visit(node)
        finally:
            self.safe = saved

    def generic_visit(self, node: ast.AST) -> ast.AST:
        if isinstance(node, _UNSAFE) and self.safe:
            return self._unsafe(node)
        return super().generic_visit(node)


def hoist_guard(guard_expr: str, body: list[str]) -> tuple[str, list[str]]:
    """Rewrite `guard_expr` and `body` so repeated access chains run once."""
    try:
        guard = ast.parse(guard_expr, mode="eval")
        body_tree = ast.parse("\n".join(body)) if body else None
    except SyntaxError:
        return guard_expr, body
    counts = _count([guard] + ([body_tree] if body_tree else []))
    repeated = {k for k, c in counts.items() if c > 1}
    if not repeated:
        return guard_expr, body
    bound: dict[str, str] = {}
    guard = ast.fix_missing_locations(_Hoist(repeated, bound, bind=True).visit(guard))
    new_guard = ast.unparse(guard)
    if body_tree is None:
        return new_guard, body
    # NOTE: the body runs only after the whole guard held, so every binding
    # exists; but the body may write attributes (replayed side effects) or
    # call user code, after which a hoisted value could be stale.  Only its
    # leading statements up to the graph call, which can do neither, read the
    # hoisted locals.
    n = _pure_prefix(body_tree.body)
    if n == 0:
        return new_guard, body
    hoist = _Hoist(repeated, bound, bind=False)
    head = [ast.fix_missing_locations(hoist.visit(stmt)) for stmt in body_tree.body[:n]]
    rest = ast.Module(body=body_tree.body[n:], type_ignores=[])
    lines = ast.unparse(ast.Module(body=head, type_ignores=[])).splitlines()
    return new_guard, lines + (ast.unparse(rest).splitlines() if rest.body else [])


def _calls_only_graph(node: ast.AST) -> bool:
    return all(isinstance(c.func, ast.Name) and c.func.id == "___graph"
               for c in ast.walk(node) if isinstance(c, ast.Call))


def _pure_prefix(stmts: list[ast.stmt]) -> int:
    """How many leading statements are `name = expr` with no call but the graph's."""
    n = 0
    for stmt in stmts:
        if not (isinstance(stmt, ast.Assign) and all(isinstance(t, ast.Name) for t in stmt.targets)
                and _calls_only_graph(stmt.value)):
            break
        n += 1
        if any(isinstance(c, ast.Call) for c in ast.walk(stmt.value)):
            break  # the graph call: stop right after it
    return n
