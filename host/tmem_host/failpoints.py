"""Failpoints: named places in tmemd where a test makes it die, to prove what a
crash there leaves behind (the crash tests of save, restore and handoff).

``TMEMD_FAILPOINTS=name[,name...]`` in tmemd's environment: reaching one of
them, tmemd SIGKILLs itself, exactly as a ``kill -9`` at that instant would.
Without the variable a failpoint is one dict lookup.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Final

log = logging.getLogger("tmemd")

ENVIRONMENT: Final = "TMEMD_FAILPOINTS"
_ARMED: Final = frozenset(filter(None, os.environ.get(ENVIRONMENT, "").split(",")))


def failpoint(name: str) -> None:
    """Die here (SIGKILL) if the failpoint ``name`` is armed."""
    if name in _ARMED:
        log.warning("failpoint reached: killing tmemd", extra={"failpoint": name})
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
