"""kiln.export: a model as a self-contained program, for runtimes without its Python code.

    ep = kiln.export.export(model, (x,), dynamic_shapes={"x": {0: Dim("batch")}})
    ep.module()(x)                    # runs the program (inputs checked against it)
    kiln.export.save(ep, "model.kiln")
    ep2 = kiln.export.load("model.kiln")
    fast = kiln.export.compile(ep2)   # the program through kiln's code generator

Stages: :mod:`.exporter` (strict through capture/, non-strict through tracing/, then
kiln.aot's functional export tracing), :mod:`.shapes` (Dim, derived dims, ranges),
:mod:`.program` (ExportedProgram, signature, module()), :mod:`.archive` (the file
format: JSON + safetensors, nothing unpickled), :mod:`.serialize` / :mod:`.deserialize`
(save / load), :mod:`.extras` (strict regions, joint export, TorchScript conversion,
ahead-of-time compile).
"""
from kiln.export.shapes import Dim, DerivedDim, Range, dims
from kiln.export.exporter import export
from kiln.export.extras import compile, export_forward_backward, from_torchscript, mark_strict
from kiln.export.program import (ExportedProgram, ExportGraphSignature, InputKind, InputSpec, OutputKind,
                                 OutputSpec)
from kiln.export.deserialize import load
from kiln.export.serialize import save

__all__ = ["export", "ExportedProgram", "ExportGraphSignature", "InputSpec", "OutputSpec", "InputKind",
           "OutputKind", "Dim", "DerivedDim", "Range", "dims", "save", "load", "compile",
           "export_forward_backward", "from_torchscript", "mark_strict"]
