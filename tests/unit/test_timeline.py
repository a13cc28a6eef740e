"""Pipeline timeline: bubble fraction arithmetic and the Chrome trace format."""

import pytest

from rpc_train.pipeline.timeline import bubble_fraction, chrome_trace, handoffs_ms

pytestmark = pytest.mark.timeout(30)

# Two stages, two micro-batches, 1 s per forward: stage1 idles while stage0 runs F0.
SPANS = [[("F", 0, 0.0, 1.0), ("F", 1, 1.0, 2.0)],
         [("F", 0, 1.0, 2.0), ("F", 1, 2.0, 3.0)]]


def test_bubble_fraction_counts_idle_stage_time():
    # 4 busy stage-seconds out of 2 stages x 3 s.
    assert bubble_fraction(SPANS, 0.0, 3.0) == pytest.approx(1 - 4 / 6)
    assert bubble_fraction([[("F", 0, 0.0, 1.0)]], 0.0, 1.0) == 0.0


def test_chrome_trace_has_a_row_per_stage_and_a_box_per_span():
    trace = chrome_trace(SPANS, started=0.0)
    names = [e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"]
    boxes = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert names == ["stage0", "stage1"]
    assert [(b["tid"], b["name"], b["ts"], b["dur"]) for b in boxes] == [
        (0, "F0", 0.0, 1e6), (0, "F1", 1e6, 1e6), (1, "F0", 1e6, 1e6), (1, "F1", 2e6, 1e6)]


def test_handoffs_are_the_gaps_between_a_micro_batchs_stages():
    spans = [[("F", 0, 0.0, 1.0), ("F", 1, 1.0, 2.0), ("B", 0, 4.5, 5.0), ("B", 1, 6.0, 6.5)],
             [("F", 0, 1.25, 2.0), ("B", 0, 2.0, 4.0), ("F", 1, 4.0, 4.5), ("B", 1, 4.5, 5.0)]]
    # Forward: stage 1 starts F0 0.25 s and F1 2 s after stage 0 ends them; backward: stage 0
    # starts B0 0.5 s and B1 1 s after stage 1 ends them. Medians of two: the means.
    assert handoffs_ms(spans) == pytest.approx({"forward": 1125.0, "backward": 750.0})
    assert handoffs_ms([[("F", 0, 0.0, 1.0)]]) == {"forward": 0.0, "backward": 0.0}
