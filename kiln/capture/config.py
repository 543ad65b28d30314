"""kiln.capture.config: switches of the capture stage (patchable).

    from kiln.capture import config
    with config.patch(cache_size_limit=2): ...
    @config.patch(automatic_dynamic_shapes=False)
    def test(): ...
"""
from __future__ import annotations

from kiln.settings import make_patch, options_of

# Compiled entries kept per code object and backend before falling back to eager, counting
# only the entries compiled for the same objects the guards check by identity (an
# ``nn.Module`` instance as ``self``: PyTorch's recompile limit) ...
cache_size_limit: int = 8
# ... and all its entries, whatever they were compiled for (PyTorch's accumulated limit).
accumulated_cache_size_limit: int = 256

# dynamic=None: after a recompile caused by a changed size, compile that dim as a
# symbolic size (PyTorch's automatic_dynamic_shapes).  False: dynamic=None is static.
automatic_dynamic_shapes: bool = True
# What automatic dynamic makes a changed dim: "dynamic" (a backed symbol: 0 and 1 stay
# specialised) or "unbacked" (no hint, size-oblivious: one entry for every size, 0 and 1 too).
automatic_dynamic_shapes_mark_as: str = "dynamic"

# nn.Parameter inputs keep static shapes (PyTorch's force_parameter_static_shapes); False: their
# dims follow the same rules as other tensors' (dynamic=True, or automatic after a size change).
force_parameter_static_shapes: bool = True

# Inside DistributedDataParallel's forward, split captured graphs at DDP's gradient-bucket
# boundaries so each bucket's all-reduce overlaps the backward of the rest (PyTorch's
# optimize_ddp); False: one graph per capture, all-reduces after its whole backward.
optimize_ddp: bool = True

# ``Tensor.item()`` in a compiled region: False, a graph break (the value is data); True, a
# graph node whose result is an unbacked SymInt/SymFloat/SymBool (PyTorch's
# capture_scalar_outputs).  ``Tensor.tolist()`` of an integer tensor is captured either way.
capture_scalar_outputs: bool = False

# A compiled function whose entries' guards all fail on new inputs: False, compile another
# entry; True, raise kiln.exc.RecompileError naming the failed guard (PyTorch's
# error_on_recompile: a test that one compile serves every call).
error_on_recompile: bool = False

# A compiled function called while ``torch.fx.symbolic_trace`` traces: True, a RuntimeError
# (PyTorch's error_on_nested_fx_trace); False, the original function runs, traced by FX.
error_on_nested_fx_trace: bool = True


def get_config_copy() -> dict:
    """The current value of every option."""
    return options_of(__name__)


# NOTE: last, so it sees every option above; unknown names are rejected.
patch = make_patch(__name__)
