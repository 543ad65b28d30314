"""aot: AOT autograd — joint forward+backward graphs, partitioners, runtime wrappers.

In:  a function or nn.Module (often a captured torch-level GraphModule) and
     example inputs (real or fake tensors).
Out: a callable that runs graphs compiled by the given compilers:
     a functional ATen forward graph (inputs ``[*tokens, *params, *inputs]``,
     outputs ``[*tokens, *mutated inputs, *user outputs, *saved values]``) and,
     when gradients are needed, a backward graph (``[*saved, *tangents] -> grads``)
     compiled lazily at the first backward.
Options: one ``AOTOptions`` record (compilers, partitioner, decompositions,
keep_inference_input_mutations, num_params_buffers) per compilation; the steps
(aot.joint, aot.partition, aot.compile; for inference aot.inference,
aot.keep_input_mutations, aot.compile) are named passes (aot/pipeline.py).
Invariants: graphs contain no mutation of graph inputs and no aliasing between
outputs and inputs; the runtime wrappers restore eager semantics (input
mutations, views, requires_grad / grad_fn, grad mode) around them.
"""
from kiln.aot import config
from kiln.aot.api import aot_function, aot_module, aot_module_simplified, compile_flat
from kiln.aot.compilers import make_boxed_compiler, make_boxed_func, nop
from kiln.aot.options import AOTOptions
from kiln.aot.export import GraphSignature, BackwardSignature, aot_export_joint_simple, aot_export_module
from kiln.aot.partition import default_partition, min_cut_rematerialization_partition
from kiln.aot.runtime import DOUBLE_BACKWARD_ERROR

__all__ = [
    "config", "AOTOptions", "aot_function", "aot_module", "aot_module_simplified", "compile_flat",
    "make_boxed_func", "make_boxed_compiler", "nop", "aot_export_module", "aot_export_joint_simple",
    "GraphSignature", "BackwardSignature", "default_partition",
    "min_cut_rematerialization_partition", "DOUBLE_BACKWARD_ERROR",
]
