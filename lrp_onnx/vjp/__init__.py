"""Vector-Jacobian products, one registered function per op: registry, ops, elementwise, nn, contrib.

Importing this package imports every VJP module, so every registration is in place once `lookup` is reachable."""
from .registry import NORM_VJPS, VJPS, lookup, register, register_norm  # noqa: F401 (re-exported)
from .ops import weight_input_gradient  # noqa: F401 (re-exported); ops imports nn, then elementwise
from .nn import conv_input_gradient  # noqa: F401 (re-exported)
from . import contrib, elementwise, nn, ops  # noqa: F401 (every registration: nn, ops, elementwise, contrib)
