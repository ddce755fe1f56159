"""Minimal stand-in for torchvision, which is not installed here.

``lxt.efficient`` imports ``torchvision.models.vision_transformer`` only to build its ViT
patch map (it reads ``vision_transformer.nn.GELU`` and friends), and zennit, which lxt
imports too, imports two ResNet block classes. The tests never explain a vision model, so
this stub provides just enough for those imports to succeed. Put ``tests/stubs`` on
``sys.path`` before importing ``lxt``.
"""
from . import models  # noqa: F401
