"""Test layers that report how the code under test runs them."""

from torch import nn


class InputProbe(nn.Module):
    """Identity that records, for each input it sees, whether the input asks for a gradient."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.requires_grad)
        return x
