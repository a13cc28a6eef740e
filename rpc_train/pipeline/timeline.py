"""See the pipeline: bubble fraction, a timeline figure in TensorBoard, a Chrome trace.

Every stage records when each micro-batch's forward (F) and backward (B) ran and returns the
spans with its optimizer step. Times are perf_counter seconds (CLOCK_MONOTONIC, shared by
the processes of one machine; across machines the rows are only roughly aligned).
"""

import json
import os
import statistics
from typing import Dict, Optional, Sequence

Span = tuple  # (kind "F" | "B", micro-batch seq, start s, end s)


def bubble_fraction(spans: Sequence[Sequence[Span]], started: float, ended: float) -> float:
    """The share of stage-time in the step that no stage spent computing."""
    busy = sum(end - start for stage in spans for _, _, start, end in stage)
    total = len(spans) * (ended - started)
    return max(0.0, 1.0 - busy / total) if total > 0 else 0.0


def handoffs_ms(spans: Sequence[Sequence[Span]]) -> Dict[str, float]:
    """Median ms from a micro-batch's end on one stage to its start on the next one.

    "forward": its forward ending on stage k-1 to starting on stage k; "backward": its
    backward ending on stage k (the gradient of the input is ready) to starting on stage k-1.
    Each is the message's latency plus any wait for a core, the GIL or the stage's turn;
    under 1f1b both are on the path that sets the step (docs/benchmarks.md). 0 without a boundary.
    """
    gaps = {"forward": [], "backward": []}
    for upstream, downstream in zip(spans, spans[1:]):
        ends = {(kind, seq): (start, end) for kind, seq, start, end in upstream}
        for kind, seq, start, end in downstream:
            if (kind, seq) not in ends:
                continue
            if kind == "F":
                gaps["forward"].append(start - ends[kind, seq][1])
            else:  # the gradient goes the other way
                gaps["backward"].append(ends[kind, seq][0] - end)
    return {way: 1e3 * statistics.median(g) if g else 0.0 for way, g in gaps.items()}


def chrome_trace(spans: Sequence[Sequence[Span]], started: float) -> dict:
    """Trace Event Format: one row (tid) per stage; opens in Perfetto or chrome://tracing."""
    events = [{"name": "thread_name", "ph": "M", "pid": 0, "tid": k, "args": {"name": f"stage{k}"}}
              for k in range(len(spans))]
    for k, stage in enumerate(spans):
        for kind, seq, start, end in stage:
            events.append({"name": f"{kind}{seq}", "cat": "forward" if kind == "F" else "backward",
                           "ph": "X", "pid": 0, "tid": k,
                           "ts": 1e6 * (start - started), "dur": 1e6 * (end - start)})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def timeline_figure(spans: Sequence[Sequence[Span]], started: float):
    """Stages as rows, micro-batches as boxes coloured by index; backward boxes hatched."""
    import matplotlib

    matplotlib.use("Agg")  # no display on the driver
    import matplotlib.pyplot as plt

    seqs = sorted({seq for stage in spans for _, seq, _, _ in stage})
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(10, 1 + 0.6 * len(spans)))
    for k, stage in enumerate(spans):
        for kind, seq, start, end in stage:
            ax.broken_barh([(1e3 * (start - started), 1e3 * (end - start))], (k - 0.4, 0.8),
                           facecolors=colours(seqs.index(seq) % 10), edgecolor="black", linewidth=0.5,
                           hatch="//" if kind == "B" else None)
    ax.set_yticks(range(len(spans)), [f"stage{k}" for k in range(len(spans))])
    ax.invert_yaxis()
    ax.set_xlabel("ms since the step started (hatched: backward)")
    fig.tight_layout()
    return fig


class TimelineLogger:
    """A Trainer hook: the timeline figure every N steps, and trace.json for one chosen step."""

    def __init__(self, logger, run_dir: str, every: int, trace_step: Optional[int]):
        self.logger, self.run_dir, self.every, self.trace_step = logger, run_dir, every, trace_step

    def __call__(self, step: int, result) -> None:
        if not result.spans:
            return
        if self.every and step % self.every == 0:
            self.logger.writer.add_figure("pipeline/timeline", timeline_figure(result.spans, result.started), step)
        if step == self.trace_step:
            with open(os.path.join(self.run_dir, "trace.json"), "w") as f:
                json.dump(chrome_trace(result.spans, result.started), f)
