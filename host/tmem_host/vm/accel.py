"""Which accelerator guests use: KVM only once a probe guest has proved it.

On some hosts /dev/kvm opens and KVM_CREATE_VM succeeds, yet a KVM guest never
gets past the kernel decompressor. So `auto` boots the image's kernel with a
tiny initramfs that prints a marker and powers off; no marker within the probe
timeout means TCG. On others (a CPU without VMX/SVM behind a /dev/kvm that
opens) the vCPU thread spins in the host kernel and never enters the guest: the
probe says so as soon as that thread has burned STUCK_VCPU_CPU_S of CPU with no
tick of guest time, instead of holding a core until the timeout.

The verdict is cached in ~/.cache/tmem-testbed/accel.json, keyed by the host
kernel, the QEMU version and the guest kernel.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from tmem_host.testbed.hostmetrics import process_usage
from tmem_host.vm.image import GuestImage, cache_root
from tmem_host.vm.recipe import PROBE_MARKER

PROBE_TIMEOUT_S = 25.0
# A working KVM guest prints the marker in about a second, nearly all of it in
# guest mode; this much CPU without one tick there is a vCPU that cannot enter.
STUCK_VCPU_CPU_S = 2.0
QEMU_BINARY = "qemu-system-x86_64"


@dataclass(frozen=True, slots=True)
class AccelVerdict:
    accel: Literal["kvm", "tcg"]
    reason: str  # one line for humans (doctor)
    key: str  # what the verdict depends on


def verdict_cache_path() -> Path:
    return cache_root() / "accel.json"


def qemu_version(binary: str = QEMU_BINARY) -> str:
    """QEMU's version line, e.g. '7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)'."""
    output = subprocess.run([binary, "--version"], capture_output=True, text=True,
                            check=True).stdout
    return output.splitlines()[0].removeprefix("QEMU emulator version ").strip()


def verdict_key(image: GuestImage) -> str:
    return f"host {platform.release()} | qemu {qemu_version()} | guest {image.kernel_version}"


def kvm_device_problem() -> str | None:
    """Why /dev/kvm cannot be used, or None when it opens read-write."""
    try:
        descriptor = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return "/dev/kvm does not exist"
    except OSError as error:
        return f"/dev/kvm does not open ({error.strerror})"
    os.close(descriptor)
    return None


def probe_kvm(image: GuestImage, timeout: float = PROBE_TIMEOUT_S) -> AccelVerdict:
    """Boot the probe initramfs under KVM; the marker on the console proves KVM."""
    key = verdict_key(image)
    problem = kvm_device_problem()
    if problem is not None:
        return AccelVerdict("tcg", f"{problem}: using TCG", key)
    with tempfile.TemporaryDirectory(prefix="tmem-kvm-probe-") as scratch:
        console = Path(scratch) / "console.log"
        command = [
            QEMU_BINARY, "-accel", "kvm", "-M", "q35", "-cpu", "host", "-m", "128",
            "-nodefaults", "-display", "none", "-no-reboot",
            "-chardev", f"file,id=console,path={console}", "-serial", "chardev:console",
            "-kernel", str(image.kernel), "-initrd", str(image.probe_initrd),
            "-append", "console=ttyS0 panic=-1 quiet",
        ]
        started = time.monotonic()
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, start_new_session=True)
        try:
            while time.monotonic() - started < timeout:
                if console.exists() and PROBE_MARKER.encode() in console.read_bytes():
                    elapsed = time.monotonic() - started
                    return AccelVerdict("kvm", f"a KVM probe guest booted in {elapsed:.1f} s: "
                                               "using KVM", key)
                usage = process_usage(process.pid)
                if usage is not None and usage.cpu_s >= STUCK_VCPU_CPU_S and usage.guest_cpu_s == 0:
                    return AccelVerdict("tcg", f"/dev/kvm opens but a KVM probe guest's vCPU spent "
                                               f"{usage.cpu_s:.1f} s of CPU in the host without "
                                               "entering the guest (hung): using TCG", key)
                if process.poll() is not None:
                    assert process.stderr is not None
                    error = process.stderr.read().decode(errors="replace").strip()
                    last = error.splitlines()[-1] if error else f"exit code {process.returncode}"
                    return AccelVerdict("tcg", f"/dev/kvm opens but QEMU could not start a KVM "
                                               f"guest ({last}): using TCG", key)
                time.sleep(0.2)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
            if process.stderr is not None:
                process.stderr.close()
    return AccelVerdict("tcg", f"/dev/kvm opens but a KVM probe guest printed nothing past "
                               f"the BIOS in {timeout:.0f} s (hung): using TCG", key)


def cached_verdict(image: GuestImage) -> AccelVerdict | None:
    try:
        stored = json.loads(verdict_cache_path().read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("key") != verdict_key(image):
        return None
    if stored.get("accel") not in ("kvm", "tcg"):
        return None
    return AccelVerdict(stored["accel"], str(stored["reason"]), stored["key"])


def verdict(image: GuestImage, refresh: bool = False) -> AccelVerdict:
    """The cached verdict for this host, QEMU and guest kernel; probes when missing."""
    if not refresh:
        found = cached_verdict(image)
        if found is not None:
            return found
    fresh = probe_kvm(image)
    path = verdict_cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps(asdict(fresh), indent=2) + "\n")
    temporary.rename(path)
    return fresh
