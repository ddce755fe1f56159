"""Stand-in for ``torchvision.models``; see ``tests/stubs/torchvision/__init__.py``."""
from . import resnet, vision_transformer  # noqa: F401
