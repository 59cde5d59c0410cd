"""The accelerator verdict: probed by a real boot, cached per host/QEMU/guest kernel."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import pytest

from tmem_host.vm import accel
from tmem_host.vm.image import GuestImage

pytestmark = [pytest.mark.vm, pytest.mark.slow]


def test_verdict_is_probed_once_then_cached_per_key(
        image: GuestImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = tmp_path / "tmem-testbed" / "accel.json"
    started = time.monotonic()
    probed = accel.verdict(image)
    if "without entering the guest" in probed.reason:
        # A vCPU that cannot enter the guest is told apart in seconds, not at the
        # timeout (this host type: /dev/kvm opens, but the CPU has no VMX).
        assert time.monotonic() - started < accel.PROBE_TIMEOUT_S / 2, probed
    stored = json.loads(cache.read_text())
    assert stored == {"accel": probed.accel, "reason": probed.reason, "key": probed.key}
    assert platform.release() in probed.key and image.kernel_version in probed.key
    if accel.kvm_device_problem() is not None:
        assert probed.accel == "tcg"

    stored["reason"] = "taken from the cache"
    cache.write_text(json.dumps(stored))
    assert accel.verdict(image).reason == "taken from the cache"

    # A new key, or refresh, means a new probe: counted here, not booted again (one
    # real probe above is what this test pays for; on a host whose KVM hangs, 25 s each).
    probes: list[GuestImage] = []

    def counted_probe(probed_image: GuestImage, timeout: float = accel.PROBE_TIMEOUT_S) -> accel.AccelVerdict:
        probes.append(probed_image)
        return probed
    monkeypatch.setattr(accel, "probe_kvm", counted_probe)
    stored["key"] = "host another-kernel | qemu 0.0 | guest another"
    cache.write_text(json.dumps(stored))
    assert accel.verdict(image).reason == probed.reason and len(probes) == 1
    assert json.loads(cache.read_text())["key"] == probed.key  # stored under the current key
    assert accel.verdict(image).reason == probed.reason and len(probes) == 1  # cached again
    assert accel.verdict(image, refresh=True).accel == probed.accel and len(probes) == 2
