"""A warning that repeats at most once per interval, saying how many were held back.

A failure that happens on every frame (a full disk, a broker away, a broken actuator) must not
write thirty log lines a second into a Pi's journal for days; once a minute, with a count, says
the same.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

INTERVAL_S = 60.0


class ThrottledWarning:
    """`warn(message)` logs at most once per `interval_s`, appending the count of messages held back."""

    def __init__(self, logger: logging.Logger, clock: Callable[[], float], interval_s: float = INTERVAL_S) -> None:
        self.logger = logger
        self.clock = clock
        self.interval_s = interval_s
        self._last: Optional[float] = None
        self.held_back = 0

    def warn(self, message: str, now: Optional[float] = None) -> bool:
        """Log `message` unless one was logged less than `interval_s` ago; True when it was logged.

        A clock that stepped backwards counts as due (the interval is then unknown).
        """
        now = self.clock() if now is None else now
        if self._last is not None and 0 <= now - self._last < self.interval_s:
            self.held_back += 1
            return False
        if self.held_back:
            message += " (%d more not logged in the last %g s)" % (self.held_back, self.interval_s)
        self.logger.warning(message)
        self._last = now
        self.held_back = 0
        return True
