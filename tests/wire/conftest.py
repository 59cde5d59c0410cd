"""Hypothesis profiles for the wire tests.

`wire-fast` (the default) keeps tests/wire to a few seconds; `wire-thorough`
is for hunting bugs: TMEM_WIRE_PROFILE=wire-thorough pytest tests/wire.
The wire tests apply the chosen profile per test (settings(WIRE_PROFILE)) rather
than loading it globally, so other suites keep their own settings.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile(
    "wire-fast", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "wire-thorough", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
