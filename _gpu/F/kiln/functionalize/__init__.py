"""functionalize: mutations and views out, effect tokens in.

Input: a Python function (or the code a tracer runs).
Output: the same computation expressed with functional ATen ops only, recorded
by whatever tracing mode sits below ``FunctionalizeMode``:

* every in-place op, ``out=`` op, ``copy_``, ``set_``, ``resize_`` and in-place
  view op is replaced by functional ops (``add_`` -> ``add``, ``x[i] = v`` ->
  ``select_scatter``...);
* aliases of a mutated tensor see the new value (their views are re-played on
  the updated base);
* mutated inputs are written back at the end (``copy_`` epilogue) or returned
  as extra outputs, as the caller chooses;
* effectful ops become ``with_effects(token, op, ...)`` threaded in program order.

Invariants on the output: the only mutations left are the epilogue's writes
to graph inputs (or none with write_back="outputs"), and in-place ops on fresh
clones for ops with no functional sibling (custom ops).  ``FunctionalMetadata``
describes per input mutates_data / mutates_metadata / mutations_under_no_grad
and per output whether it aliases an input, an output or an intermediate.
"""
from kiln.functionalize.api import describe_outputs, functionalize
from kiln.functionalize.metadata import FunctionalMetadata, InputInfo, OutputInfo
from kiln.functionalize.mode import FunctionalizeMode
from kiln.functionalize.mutations import is_mutating, plan_for
from kiln.functionalize.views import is_view_op

__all__ = [
    "functionalize",
    "describe_outputs",
    "FunctionalizeMode",
    "FunctionalMetadata",
    "InputInfo",
    "OutputInfo",
    "is_mutating",
    "is_view_op",
    "plan_for",
]
