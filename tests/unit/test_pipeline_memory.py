"""The activation meter counts what autograd holds for the backward, parameters excluded."""

import pytest
import torch
from torch import nn

from rpc_train.pipeline.memory import MB, ActivationMeter

pytestmark = pytest.mark.timeout(60)


def test_the_meter_holds_a_micro_batch_from_its_forward_to_its_backward():
    layers = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    meter = ActivationMeter(layers.parameters(), torch.device("cpu"))
    x = [torch.randn(3, 4), torch.randn(5, 4)]
    outs = []
    for seq, chunk in enumerate(x):
        with meter.forward(seq):
            outs.append(layers(chunk))
        meter.held(seq)
    # Linear saves its input (and its weight, a parameter: not counted); ReLU its output.
    first, second = (c.nbytes + o.nbytes for c, o in zip(x, outs))
    assert meter.pop_peak_mb() == pytest.approx((first + second) / MB)
    meter.released(0)
    # Each period's peak starts from what was held when it began.
    assert meter.pop_peak_mb() == pytest.approx((first + second) / MB)
    assert meter.pop_peak_mb() == pytest.approx(second / MB)
    meter.released(1)
    assert meter.pop_peak_mb() == pytest.approx(second / MB) and meter.pop_peak_mb() == 0


def test_micro_batches_that_are_views_of_one_batch_count_their_input_once():
    # Stage 0's micro-batches are views of one batch; a first layer that saves its input saves
    # that one storage.
    layer = nn.Linear(4, 8)
    meter = ActivationMeter(layer.parameters(), torch.device("cpu"))
    batch = torch.randn(6, 4)
    outs = []
    for seq, chunk in enumerate(batch.tensor_split(2)):
        with meter.forward(seq):
            outs.append(layer(chunk))  # Linear saves its input only: nothing of its own
        meter.held(seq)
    assert meter.pop_peak_mb() == pytest.approx(batch.nbytes / MB)
    meter.released(0)
    assert meter.pop_peak_mb() == pytest.approx(batch.nbytes / MB)  # micro-batch 1 still holds it
    meter.released(1)
    meter.pop_peak_mb()
    assert meter.pop_peak_mb() == 0
