"""The one table of library types whose behaviour capture models by name.

Capture never imports these libraries; an entry matches a class through the
qualified name (``module.QualName``) of any class in its MRO.  Every entry says
why its type needs a model of its own; everything else is handled generically
(user classes are inlined, dataclasses are built after the graph runs).
"""
from __future__ import annotations

from typing import Optional


class SetFieldsMapping:
    """A dataclass that is also an ordered mapping of its fields that are not None,
    in field order: ``obj["name"]`` reads a field, ``obj[i]`` / ``obj[a:b]`` and
    ``obj.to_tuple()`` index the tuple of set fields, ``keys()`` / ``values()`` /
    ``items()`` list them."""

    name = "mapping of the fields that are not None"


# NOTE: qualified class name -> the model capture uses for instances built in the region.
KNOWN_LIBRARY_TYPES: dict[str, type] = {
    # transformers' model outputs (BaseModelOutput, CausalLMOutput, ...) subclass
    # ModelOutput, an OrderedDict + @dataclass whose __post_init__ fills the mapping
    # with the fields that are not None; its __getitem__ / to_tuple read that mapping.
    # Modelled here rather than inlined: __post_init__ runs library type checks
    # (is_tensor over every framework) that are not worth tracing.
    "transformers.utils.generic.ModelOutput": SetFieldsMapping,
    # diffusers copied the same class (BaseOutput) with the same semantics.
    "diffusers.utils.outputs.BaseOutput": SetFieldsMapping,
}


def library_model(cls: type) -> Optional[type]:
    """The model of ``cls`` from the table (searching its MRO), or None."""
    for klass in getattr(cls, "__mro__", ()):
        model = KNOWN_LIBRARY_TYPES.get(f"{klass.__module__}.{klass.__qualname__}")
        if model is not None:
            return model
    return None


__all__ = ["KNOWN_LIBRARY_TYPES", "SetFieldsMapping", "library_model"]
