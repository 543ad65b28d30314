"""The model zoo's fast models through the Triton printer (config.cpu_backend="triton",
kernels under Triton's interpreter), forward and backward: the same checks as
test_lowering_models (values, gradients, no fallback, kernels generated)."""
from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="optional engine triton is not installed")

from kiln.codegen import config  # noqa: E402

from test_lowering_models import FAST, _run  # noqa: E402


@pytest.mark.parametrize("name", FAST)
def test_model_through_triton(name: str, tmp_path) -> None:
    with config.patch(cpu_backend="triton", cache_dir=str(tmp_path)):
        _run(name)
