"""tracing/: dispatch-level tracing of Python callables into ATen fx graphs.

In:  a function or nn.Module and example inputs (pytrees of tensors/scalars).
Out: a torch.fx.GraphModule whose call_function nodes target ATen OpOverloads,
     custom ops and kiln's higher-order ops; parameters/buffers are get_attr
     nodes.  Invariants: every node carries meta["val"] (FakeTensor, SymInt or
     Python value), tensor nodes carry meta["tensor_meta"]; in-place and view
     ops are recorded as they ran (functionalization is functionalize/'s job).
"""
from kiln.tracing.make_fx import make_fx, register_entry_pass
from kiln.tracing.tracer import Tracer, TracingMode, current_tracer

__all__ = ["make_fx", "register_entry_pass", "Tracer", "TracingMode", "current_tracer"]
