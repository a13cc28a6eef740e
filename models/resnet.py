"""torchvision's ResNets flattened into a sequence of blocks, so they can be pipelined."""

from typing import Sequence

import torchvision
from torch import nn


def _as_sequence(net: torchvision.models.ResNet, in_channels: int, small_input: bool) -> nn.Sequential:
    if small_input:
        # The ImageNet stem (7x7 stride-2 conv, then max-pool) shrinks a 32x32 image to 8x8
        # before the first block; small images keep their resolution with a 3x3 stem instead.
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    # Each residual block is one pipeline unit: finer than torchvision's four `layerN`s.
    blocks = [block for stage in (net.layer1, net.layer2, net.layer3, net.layer4) for block in stage]
    head = [net.avgpool, nn.Flatten(), net.fc]
    return nn.Sequential(stem, *blocks, *head)


def resnet18(in_shape: Sequence[int], num_classes: int, small_input: bool = True) -> nn.Sequential:
    net = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    return _as_sequence(net, in_shape[0], small_input)


def resnet50(in_shape: Sequence[int], num_classes: int, small_input: bool = True) -> nn.Sequential:
    net = torchvision.models.resnet50(weights=None, num_classes=num_classes)
    return _as_sequence(net, in_shape[0], small_input)
