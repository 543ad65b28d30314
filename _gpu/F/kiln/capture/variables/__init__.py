"""Variable trackers: symbolic stand-ins for Python values during capture."""
from .base import VT, ConstantVT, NullVT, const_vt, unsupported  # noqa: F401
