"""kiln.aot.config: switches of the AOT autograd stage (patchable, like torch._functorch.config).

    from kiln.aot import config
    with config.patch(unlift_effect_tokens=True): ...
    @config.patch(debug_assert=True)
    def test(): ...
"""
from __future__ import annotations

from kiln.settings import make_patch, options_of

# NOTE: exported graphs take effect tokens as inputs and return them, unless
# this is set; then the graph makes its token (prims._make_token) and sinks it.
unlift_effect_tokens: bool = False
# Check at run time that inputs match what was traced (requires_grad, duplicates).
debug_assert: bool = False
# When tracing hits an op that reads data (item(), nonzero()) or has no fake
# kernel, run the function eagerly instead of failing (a warning says why).
fallback_to_eager_on_data_dependence: bool = True
# Let fake tensors made by kiln.aot hand out (meaningless) data pointers.  Off:
# C++ code that reads data while tracing fails with "Cannot access data pointer".
fake_tensor_allow_unsafe_data_ptr_access: bool = False
# The autocast state the backward of a joint graph is traced under.  "off": none, as eager's
# backward runs when ``.backward()`` is called outside autocast regions (what PyTorch's AMP
# recipe does); also right for a resume function compiled inside a region a graph break
# cut.  "same_as_forward": the state of the call being compiled (PyTorch's default).
backward_pass_autocast: str = "off"

def get_config_copy() -> dict:
    """The current value of every option."""
    return options_of(__name__)


# NOTE: last, so it sees every option above; unknown names are rejected.
patch = make_patch(__name__)
