"""The accelerator verdict: probed by a real boot, cached per host/QEMU/guest kernel."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest

from tmem_host.vm import accel
from tmem_host.vm.image import GuestImage

pytestmark = [pytest.mark.vm, pytest.mark.slow]


def test_verdict_is_probed_once_then_cached_per_key(
        image: GuestImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = tmp_path / "tmem-testbed" / "accel.json"
    probed = accel.verdict(image)
    stored = json.loads(cache.read_text())
    assert stored == {"accel": probed.accel, "reason": probed.reason, "key": probed.key}
    assert platform.release() in probed.key and image.kernel_version in probed.key
    if accel.kvm_device_problem() is not None:
        assert probed.accel == "tcg"

    stored["reason"] = "taken from the cache"
    cache.write_text(json.dumps(stored))
    assert accel.verdict(image).reason == "taken from the cache"

    stored["key"] = "host another-kernel | qemu 0.0 | guest another"
    cache.write_text(json.dumps(stored))
    assert accel.verdict(image).reason == probed.reason  # a new key means a new probe
    assert accel.verdict(image, refresh=True).accel == probed.accel
