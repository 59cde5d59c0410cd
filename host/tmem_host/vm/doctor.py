"""`tmem-testbed doctor`: is this machine ready to boot tmem guests, and if not, what to fix."""
from __future__ import annotations

import argparse
import importlib
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tmem_host.vm import accel
from tmem_host.vm.image import cache_root, cached_image, images_dir, recipe_hash
from tmem_host.vm.recipe import HOST_BUSYBOX

Level = Literal["ok", "warn", "FAIL"]
# Building the image takes about 1.5 GB of scratch plus the result; guests add overlays.
DISK_FAIL_BYTES = 3 << 30
DISK_WARN_BYTES = 10 << 30
IMAGE_TOOLS = ("debootstrap", "chroot", "apt-get", "dpkg-deb", "cpio", "mkfs.ext4")


@dataclass(frozen=True, slots=True)
class Check:
    level: Level
    topic: str
    detail: str
    fix: str = ""


def check_qemu() -> Check:
    if shutil.which(accel.QEMU_BINARY) is None:
        return Check("FAIL", "qemu", f"{accel.QEMU_BINARY} not found",
                     "apt-get install qemu-system-x86 qemu-utils (make deps does it)")
    return Check("ok", "qemu", accel.qemu_version())


def check_image() -> Check:
    image = cached_image()
    if image is None:
        missing = [tool for tool in IMAGE_TOOLS if shutil.which(tool) is None]
        if not HOST_BUSYBOX.is_file():
            missing.append(str(HOST_BUSYBOX))
        fix = "make image" if not missing else \
            f"install ci/system-packages.txt (missing: {', '.join(missing)}), then make image"
        return Check("FAIL", "image", f"not built for recipe {recipe_hash()} in {images_dir()}",
                     fix)
    stale = [p for p in images_dir().iterdir() if p.is_dir() and not p.name.startswith(".")
             and p != image.directory]
    detail = (f"recipe {image.manifest['recipe_hash']}, kernel {image.kernel_version}, "
              f"built {image.manifest['built_at']}, up to date")
    if stale:
        return Check("warn", "image", detail + f"; {len(stale)} stale image(s) in {images_dir()}",
                     "python -m tmem_host.vm.image prune")
    return Check("ok", "image", detail)


def check_accelerator() -> Check:
    image = cached_image()
    if image is None:
        problem = accel.kvm_device_problem()
        return Check("warn", "accelerator",
                     "unknown until the image is built (the probe boots its kernel)"
                     + (f"; {problem}" if problem else ""), "make image")
    verdict = accel.verdict(image)
    return Check("ok", "accelerator", verdict.reason)


def check_disk() -> Check:
    root = cache_root()
    existing = next(p for p in (root, *root.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    detail = f"{free / 2**30:.1f} GiB free under {existing}"
    if free < DISK_FAIL_BYTES:
        return Check("FAIL", "disk", detail, f"free at least {DISK_FAIL_BYTES >> 30} GiB")
    if free < DISK_WARN_BYTES:
        return Check("warn", "disk", detail, "testbed runs write swap and data disk files")
    return Check("ok", "disk", detail)


def check_tmemd() -> Check:
    try:
        process_module = importlib.import_module("tmem_host.daemon.process")
    except ImportError as error:
        return Check("FAIL", "tmemd", f"not importable: {error}", "pip install -e . (make deps)")
    with tempfile.TemporaryDirectory(prefix="tmem-doctor-") as run_dir:
        daemon = process_module.TmemdProcess(Path(run_dir), guests=("doctor",))
        try:
            daemon.start(timeout=20.0)
            socket_ok = daemon.abi_socket("doctor").exists()
            code = daemon.terminate()
        except (process_module.TmemdFailed, OSError, subprocess.SubprocessError) as error:
            daemon.kill()
            return Check("FAIL", "tmemd", f"does not start: {error}",
                         "see the log above; python -m tmem_host.daemon.main --help")
    if not socket_ok or code != 0:
        return Check("FAIL", "tmemd", f"started but socket={socket_ok}, exit code {code}")
    return Check("ok", "tmemd", "starts, listens on its guest socket, stops cleanly")


def check_vsock() -> Check:
    if Path("/dev/vhost-vsock").exists():
        return Check("ok", "vsock", "/dev/vhost-vsock present: VmConfig(vsock_cid=N) works")
    return Check("ok", "vsock", "no /dev/vhost-vsock: guests use virtio-serial only (fine)")


CHECKS = (check_qemu, check_image, check_accelerator, check_disk, check_tmemd, check_vsock)


def run_doctor(arguments: argparse.Namespace) -> int:
    failed = False
    for check in CHECKS:
        result = check()
        failed |= result.level == "FAIL"
        print(f"{'[' + result.level + ']':<7}{result.topic:<12}{result.detail}", flush=True)
        if result.fix:
            print(f"{'':19}fix: {result.fix}", flush=True)
    print("doctor: " + ("something essential is missing" if failed else "ready"))
    return 1 if failed else 0


def add_subcommands(subcommands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    doctor = subcommands.add_parser("doctor", help="check QEMU, KVM, the image, disk, tmemd")
    doctor.set_defaults(handler=run_doctor)
