"""Stand-in for ``torchvision.models.resnet``: zennit (imported by lxt) imports these two
block classes to build ResNet canonizers, which the tests never use."""
from torch import nn


class BasicBlock(nn.Module):
    """Placeholder; never instantiated."""


class Bottleneck(nn.Module):
    """Placeholder; never instantiated."""
