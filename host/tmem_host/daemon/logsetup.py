"""Structured logging for tmemd: text or JSON lines on stderr.

Context goes in `extra={...}`; both formats render those fields, so a log
call never formats values into its message and JSON lines stay parseable.

The handler rate-limits repeats (RateLimitFilter): a flood of one message (a
connection storm, asyncio's accept errors when descriptors run out) costs a few
lines, not the disk.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Final

# Attributes every LogRecord has; anything else came from `extra`.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName",
}


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {key: value for key, value in vars(record).items() if key not in _STANDARD_ATTRS}


class JsonLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_extra_fields(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        fields = " ".join(f"{key}={value}" for key, value in _extra_fields(record).items())
        line = f"{stamp}.{int(record.msecs):03d} {record.levelname:<7} {record.name}: "
        line += record.getMessage() + (f" {fields}" if fields else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


@dataclass(slots=True)
class _Bucket:
    tokens: float
    refilled_at: float
    suppressed: int = 0


class RateLimitFilter(logging.Filter):
    """Lets through at most ``burst`` lines per key, then one per ``interval_s``
    (a token bucket per key). The key is (logger, message template, level):
    context is in `extra`, so one kind of event is one key whatever its values.

    A line let through after others of its key were dropped carries
    ``suppressed=N``. Only a key's first line keeps its traceback: its repeats,
    until the bucket is full again, lose exc_info and stack_info.
    """

    #: Keys remembered at most; beyond it, keys whose bucket is full are forgotten.
    MAX_KEYS: Final = 1024

    def __init__(self, *, burst: int = 10, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst = burst
        self.interval_s = interval_s
        self._clock = clock
        self._buckets: dict[tuple[str, Hashable, int], _Bucket] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, _template(record.msg), record.levelno)
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.MAX_KEYS:
                self._forget_full(now)
            self._buckets[key] = _Bucket(self.burst - 1.0, now)
            return True
        bucket.tokens = min(float(self.burst),
                            bucket.tokens + (now - bucket.refilled_at) / self.interval_s)
        bucket.refilled_at = now
        if bucket.tokens >= self.burst and not bucket.suppressed:
            bucket.tokens -= 1.0  # quiet long enough: a first line again
            return True
        if bucket.tokens < 1.0:
            bucket.suppressed += 1
            return False
        bucket.tokens -= 1.0
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        if bucket.suppressed:
            record.suppressed = bucket.suppressed
            bucket.suppressed = 0
        return True

    def _forget_full(self, now: float) -> None:
        for key, bucket in list(self._buckets.items()):
            refilled = bucket.tokens + (now - bucket.refilled_at) / self.interval_s
            if refilled >= self.burst and not bucket.suppressed:
                del self._buckets[key]
        if len(self._buckets) >= self.MAX_KEYS:  # all busy: drop the oldest half
            for key in list(self._buckets)[: self.MAX_KEYS // 2]:
                del self._buckets[key]


def _template(message: object) -> Hashable:
    try:
        hash(message)
    except TypeError:  # e.g. a dict logged as the message
        return str(message)
    return message


def configure_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLineFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RateLimitFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
