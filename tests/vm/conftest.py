"""Fixtures and helpers for the launcher tests: the cached image, orphan checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from tmem_host.vm.image import GuestImage, require_image


@pytest.fixture(scope="session")
def image() -> GuestImage:
    """The image of the current recipe (`make test` builds it first)."""
    return require_image()


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains `text` (a guest's unique run directory)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue  # exited while we looked
    return found
