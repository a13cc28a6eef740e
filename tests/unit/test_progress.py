"""The driver's progress report (rpc_train/metrics/progress.py): a bar or plain lines."""

import io
import logging
import re

import pytest

from rpc_train.config.compose import compose
from rpc_train.config.errors import ConfigError
from rpc_train.config.validate import validate
from rpc_train.metrics.progress import Progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def plain_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "rpc_train.progress"]


def test_a_file_gets_one_plain_line_per_interval_and_one_at_the_end(caplog):
    caplog.set_level(logging.INFO)
    stream = io.StringIO()
    progress = Progress(10, initial=2, epochs=3, every_s=0.0, stream=stream)  # a line at every update
    progress.update(3, samples=32, loss=2.5, epoch=0)
    progress.every_s = 3600.0  # nothing more until close
    progress.update(4, samples=32, loss=1.5, epoch=1)
    progress.update(5, samples=32, loss=0.5, epoch=1)
    progress.close()
    lines = plain_lines(caplog)
    assert stream.getvalue() == ""  # nothing on the stream itself: the lines go through logging
    assert len(lines) == 2
    assert re.fullmatch(r"train step 3/10 \(30%\) epoch 1/3: loss 2\.5000, \d+ samples/s, ETA \d+:\d\d:\d\d", lines[0])
    # The closing line: the mean loss of its stretch (1.5 and 0.5), and an ETA: the run stopped short.
    assert re.fullmatch(r"train step 5/10 \(50%\) epoch 2/3: loss 1\.0000, \d+ samples/s, ETA \d+:\d\d:\d\d", lines[1])


def test_a_terminal_gets_the_bar_and_no_plain_lines(caplog):
    caplog.set_level(logging.INFO)
    terminal = Terminal()
    progress = Progress(4, every_s=0.0, stream=terminal)
    for step in range(1, 5):
        progress.update(step, samples=8, loss=1.0, epoch=0)
    progress.close()
    assert "\r" in terminal.getvalue() and "4/4" in terminal.getvalue()
    assert plain_lines(caplog) == []


def test_off_means_neither(caplog):
    caplog.set_level(logging.INFO)
    for stream in (io.StringIO(), Terminal()):
        progress = Progress(4, every_s=0.0, enabled=False, stream=stream)
        progress.update(4, samples=8, loss=1.0)
        progress.close()
        assert stream.getvalue() == ""
    assert plain_lines(caplog) == []


@pytest.mark.parametrize("value", ["0", "-1"])
def test_a_non_positive_interval_is_one_line(value):
    with pytest.raises(ConfigError, match=f"log.progress_s={value}(.0)?: must be a positive number of seconds"):
        validate(compose([f"log.progress_s={value}"]), 3)
