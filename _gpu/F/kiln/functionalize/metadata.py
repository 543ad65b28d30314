"""The metadata record that travels with a functionalized graph.

Per input: whether its data, metadata (sizes/strides) or storage (``set_``)
was mutated, and whether every data mutation happened with grad mode off.
Per output: whether it is an input itself, a view of an input, a view of
another output, a view of an intermediate (whose base then becomes an extra
graph output), or a plain new tensor; views carry the chain of view ops that
regenerates them from their base at run time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class InputInfo:
    """What the traced code did to one input."""

    mutates_data: bool = False
    mutates_metadata: bool = False
    mutates_storage: bool = False
    # True while every data mutation so far happened under no_grad / inference mode.
    mutations_under_no_grad: bool = True
    orig_meta: Optional[tuple] = None
    storage_rec: Any = None

    def note_data_mutation(self, grad_enabled: bool) -> None:
        self.mutates_data = True
        if grad_enabled:
            self.mutations_under_no_grad = False

    @property
    def mutated(self) -> bool:
        return self.mutates_data or self.mutates_metadata or self.mutates_storage


# Output kinds.
PLAIN = "plain"                    # a new tensor computed by the graph
IS_INPUT = "is_input"              # the very input object (returned as is)
ALIAS_OF_INPUT = "alias_of_input"  # a view of input `base_index`
ALIAS_OF_OUTPUT = "alias_of_output"  # a view of user output `base_index`
ALIAS_OF_INTERMEDIATE = "alias_of_intermediate"  # a view of extra output `base_index`


@dataclass
class OutputInfo:
    """How one user output relates to inputs and other outputs."""

    kind: str = PLAIN
    base_index: Optional[int] = None
    chain: tuple = ()
    requires_grad: bool = False
    is_tensor: bool = True


@dataclass
class FunctionalMetadata:
    """Everything a runtime wrapper needs besides the graph."""

    inputs: list = field(default_factory=list)    # [InputInfo]
    outputs: list = field(default_factory=list)   # [OutputInfo]
    num_intermediate_bases: int = 0
    num_tokens: int = 0
    grad_enabled_after: bool = True

    @property
    def mutated_inputs(self) -> list:
        """Indices of inputs whose data or metadata the graph must write back."""
        return [i for i, info in enumerate(self.inputs) if info.mutated]
