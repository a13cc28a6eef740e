"""Log lines that a flood of requests cannot multiply: at most one per `every_s` seconds.

A client can send thousands of bad requests a second; a line (or a traceback) for each would
fill the disk and bury what the log is there for. `RateLimitedLog` writes the first line, holds
back those that come within `every_s` after it, and the next line it writes says how many it
held back. The metrics (observe.py) count every one.
"""

import logging
import threading
import time
from typing import Callable


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, every_s: float, clock: Callable[[], float] = time.monotonic):
        self.logger, self.every_s, self.clock = logger, every_s, clock
        self._lock = threading.Lock()
        self._next_at = float("-inf")
        self._held = 0

    def log(self, level: int, message: str, *args, exc_info=None) -> bool:
        """`logger.log(level, message, *args)` if no line was written in the last `every_s`
        seconds (True), else only counted (False)."""
        with self._lock:
            now = self.clock()
            if now < self._next_at:
                self._held += 1
                return False
            held, self._held, self._next_at = self._held, 0, now + self.every_s
        if held:
            message, args = message + " (%d more like it since the last such line were not logged)", (*args, held)
        self.logger.log(level, message, *args, exc_info=exc_info)
        return True
