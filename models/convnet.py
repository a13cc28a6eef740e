from typing import Sequence

from torch import nn


def conv_block(c_in: int, c_out: int, pool: bool) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class ConvNet(nn.Sequential):
    """A VGG-style stack of conv blocks, global average pooling and a linear classifier.

    Pooling halves the image after each block while it is still larger than 4 pixels, so
    the same config fits 8x8 digits and 32x32 CIFAR images.
    """

    def __init__(self, in_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (32, 64, 128)):
        c_in, size = in_shape[0], min(in_shape[1:])
        layers: list[nn.Module] = []
        for c_out in channels:
            pool = size > 4
            layers.append(conv_block(c_in, c_out, pool))
            size = size // 2 if pool else size
            c_in = c_out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
        super().__init__(*layers)
