from typing import Sequence

from torch import nn


class MLP(nn.Sequential):
    """Flatten, then `len(hidden)` Linear+ReLU blocks, then a linear classifier."""

    def __init__(self, in_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (256, 256)):
        in_features = 1
        for dim in in_shape:
            in_features *= dim
        layers: list[nn.Module] = [nn.Flatten()]
        for width in hidden:
            layers.append(nn.Sequential(nn.Linear(in_features, width), nn.ReLU()))
            in_features = width
        layers.append(nn.Linear(in_features, num_classes))
        super().__init__(*layers)
