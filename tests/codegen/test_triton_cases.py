"""kiln.aot's differential cases through the Triton printer (config.cpu_backend="triton",
Triton's interpreter): the same checks as test_lowering_cases, and no fallback."""
from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="optional engine triton is not installed")

from kiln import fallbacks  # noqa: E402
from kiln.codegen import config  # noqa: E402

import test_lowering_cases as cases  # noqa: E402
from test_lowering_cases import _grad_mode  # noqa: E402,F401  (autouse: cases change grad mode)


@pytest.mark.parametrize("name", sorted(set(cases.CASES) - cases.REFUSED))
def test_case_through_triton(name, tmp_path):
    mark = fallbacks.mark()
    with config.patch(cpu_backend="triton", cache_dir=str(tmp_path)):
        cases.test_case_through_codegen(name)
    assert fallbacks.recorded(mark) == []
