"""Library types modelled by name (one table) and generic dataclass handling."""
from __future__ import annotations

import dataclasses
from typing import Optional

import pytest
import torch

import kiln
from kiln.capture.variables.library_types import KNOWN_LIBRARY_TYPES, SetFieldsMapping, library_model
from kiln.exc import Unsupported
from kiln.testing import CompileCounter


def test_table_matches_through_the_mro_by_qualified_name():
    Base = type("ModelOutput", (dict,), {"__module__": "transformers.utils.generic"})
    Sub = type("CausalLMOutput", (Base,), {"__module__": "mylib"})
    assert library_model(Sub) is SetFieldsMapping
    assert library_model(dict) is None
    assert all(isinstance(k, str) and "." in k for k in KNOWN_LIBRARY_TYPES)


def test_model_output_mapping_reads_are_captured():
    generic = pytest.importorskip("transformers.utils.generic", reason="needs transformers (optional engine)")

    @dataclasses.dataclass
    class Out(generic.ModelOutput):
        a: Optional[torch.Tensor] = None
        b: Optional[torch.Tensor] = None
        c: Optional[torch.Tensor] = None

    def f(x):
        o = Out(a=x + 1, c=x * 2)
        t = o.to_tuple()
        return o[0], o[1], o["c"], o[0:2][1], len(t), list(o.keys()), "b" in o.keys(), o.get("b"), o

    cc = CompileCounter()
    x = torch.randn(3)
    got = kiln.compile(f, backend=cc, fullgraph=True)(x)
    want = f(x)
    assert cc.frame_count == 1
    for g, w in zip(got[:4], want[:4]):
        torch.testing.assert_close(g, w)
    assert got[4:8] == want[4:8] == (2, ["a", "c"], False, None)
    assert type(got[8]) is Out and list(got[8].keys()) == ["a", "c"]


def test_dict_dataclass_outside_the_table_breaks_on_mapping_reads():
    @dataclasses.dataclass
    class D(dict):
        a: torch.Tensor

    def f(x):
        d = D(x + 1)
        return d["a"]

    with pytest.raises(Unsupported, match="mapping contents"):
        kiln.compile(f, backend="eager", fullgraph=True)(torch.randn(2))


def test_plain_dataclass_methods_are_inlined():
    @dataclasses.dataclass
    class P:
        u: torch.Tensor
        v: torch.Tensor

        def __getitem__(self, i):
            return (self.u, self.v)[i]

        def total(self):
            return self.u + self.v

    def f(x):
        p = P(x, x * 3)
        return p[1] + p.total()

    cc = CompileCounter()
    x = torch.randn(3)
    torch.testing.assert_close(kiln.compile(f, backend=cc, fullgraph=True)(x), f(x))
    assert cc.frame_count == 1
