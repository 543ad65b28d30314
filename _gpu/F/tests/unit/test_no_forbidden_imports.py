"""kiln builds PyTorch's compiler stack itself: the package must not import it.

Scans every .py file under kiln/ with ast and fails naming file:line for
  * imports of a forbidden module (``import``, ``from ... import``, ``from torch import _dynamo``,
    ``importlib.import_module("...")`` / ``__import__("...")`` with a literal name),
  * attribute chains reaching one (``torch._dynamo.reset()``, ``torch.export.export``),
  * calls of ``torch.compile``.
Tests and benchmarks may import these to compare; the package may not.
"""
from __future__ import annotations

import ast
import pathlib
from typing import Iterator, Optional

import pytest

# The list in the project's rules, plus the packages that are the same code under
# another name (functorch.compile re-exports AOT autograd; _aot_autograd implements it).
FORBIDDEN = (
    "torch._dynamo",
    "torch._inductor",
    "torch._functorch.aot_autograd",
    "torch._functorch._aot_autograd",
    "torch._functorch.partitioners",
    "torch.export",
    "torch._higher_order_ops",
    "torch.fx.experimental.proxy_tensor",
    "torch.func.functionalize",
    "torch._subclasses.functional_tensor",
    "functorch.compile",
)
FORBIDDEN_CALLS = ("torch.compile",)

KILN = pathlib.Path(__file__).resolve().parents[2] / "kiln"


def _forbidden(module: str) -> Optional[str]:
    for bad in FORBIDDEN:
        if module == bad or module.startswith(bad + "."):
            return bad
    return None


def _dotted(node: ast.AST) -> Optional[str]:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _imported_names(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return []


def _dynamic_import(node: ast.AST) -> Optional[str]:
    if not isinstance(node, ast.Call) or not node.args:
        return None
    name = _dotted(node.func)
    arg = node.args[0]
    if name in ("importlib.import_module", "import_module", "__import__") and isinstance(arg, ast.Constant):
        return str(arg.value)
    return None


def violations(source: str, filename: str) -> Iterator[str]:
    """Every forbidden import/use/call in ``source``, as 'file:line: what'."""
    tree = ast.parse(source, filename=filename)
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        for name in _imported_names(node) + [m for m in [_dynamic_import(node)] if m]:
            if _forbidden(name):
                yield f"{filename}:{line}: imports {name}"
                break
        if isinstance(node, ast.Attribute):
            dotted = _dotted(node)
            if dotted and _forbidden(dotted):
                yield f"{filename}:{line}: uses {dotted}"
        if isinstance(node, ast.Call) and _dotted(node.func) in FORBIDDEN_CALLS:
            yield f"{filename}:{line}: calls {_dotted(node.func)}"


def _outermost_only(found: list[str]) -> list[str]:
    # NOTE: `torch._dynamo.reset` walks as two Attribute nodes; keep one report per line+kind.
    seen, out = set(), []
    for item in found:
        file_line, what = item.split(": ", 1)
        key = (file_line, what.split(" ")[0])
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def scan_package(root: pathlib.Path = KILN) -> list[str]:
    found: list[str] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent)
        found.extend(violations(path.read_text(encoding="utf-8"), str(rel)))
    return _outermost_only(found)


def test_kiln_imports_none_of_torchs_compiler_stack():
    found = scan_package()
    assert not found, "kiln must not use PyTorch's compiler stack:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "snippet,expected",
    [
        ("import torch._dynamo", "imports torch._dynamo"),
        ("import torch._dynamo.config as c", "imports torch._dynamo.config"),
        ("from torch._inductor.compile_fx import compile_fx", "imports torch._inductor.compile_fx"),
        ("from torch import _dynamo", "imports torch._dynamo"),
        ("from torch.fx.experimental import proxy_tensor", "imports torch.fx.experimental.proxy_tensor"),
        ("from torch.func import functionalize", "imports torch.func.functionalize"),
        ("from functorch.compile import aot_function", "imports functorch.compile"),
        ("import importlib\nimportlib.import_module('torch.export')", "imports torch.export"),
        ("import torch\ntorch._dynamo.reset()", "uses torch._dynamo"),
        ("import torch\nf = torch.compile(lambda x: x)", "calls torch.compile"),
        ("import torch\nx = torch.export.export", "uses torch.export"),
    ],
)
def test_scanner_catches(snippet, expected):
    found = _outermost_only(list(violations(snippet, "snippet.py")))
    assert any(expected in f for f in found), found
    assert all(f.startswith("snippet.py:") for f in found)


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\nimport torch.fx\nfrom torch.fx.experimental.symbolic_shapes import ShapeEnv",
        "from torch._subclasses.fake_tensor import FakeTensorMode",
        "import torch.utils._pytree as pytree",
        '"""mentions torch._dynamo and torch.compile in a docstring"""',
        "from torch._decomp import core_aten_decompositions",
        "import torch\ny = torch.compiled_thing",
        "from kiln.export import export",
    ],
)
def test_scanner_allows(snippet):
    assert list(violations(snippet, "ok.py")) == []
