"""Stand-in for ``torchvision.models.vision_transformer``: exposes ``nn`` so that
``vision_transformer.nn.GELU``, ``.nn.LayerNorm`` and ``.nn.MultiheadAttention`` resolve."""
from torch import nn  # noqa: F401
