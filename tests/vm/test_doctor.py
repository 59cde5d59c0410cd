"""`tmem-testbed doctor` on this machine, and with an empty image cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tmem_host.vm import accel
from tmem_host.vm.image import GuestImage, recipe_hash

pytestmark = pytest.mark.vm


def doctor(environment: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tmem_host.cli", "doctor"], text=True,
                          capture_output=True, timeout=120, env=environment)


def test_doctor_passes_with_the_image_built(image: GuestImage) -> None:
    result = doctor()
    assert result.returncode == 0, result.stdout + result.stderr
    lines = {line.split()[1]: line for line in result.stdout.splitlines() if line.startswith("[")}
    assert lines["image"].startswith(("[ok]", "[warn]"))  # warn: stale images around
    assert image.manifest["recipe_hash"] in lines["image"]
    assert accel.verdict(image).reason in lines["accelerator"]
    assert "starts, listens" in lines["tmemd"] and lines["qemu"].startswith("[ok]")


def test_doctor_fails_and_says_what_to_fix_without_an_image(tmp_path: Path) -> None:
    result = doctor({**os.environ, "XDG_CACHE_HOME": str(tmp_path)})
    assert result.returncode == 1
    assert f"[FAIL] image       not built for recipe {recipe_hash()}" in result.stdout
    assert "fix: make image" in result.stdout
    assert "something essential is missing" in result.stdout
