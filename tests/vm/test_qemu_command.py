"""qemu_command(): the QEMU argv of each guest configuration, without starting QEMU.

The function is pure, so these tests need neither the guest image nor QEMU: the
image and the paths below are made up and never touched.
"""

from __future__ import annotations

import base64
import builtins
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tmem_host.vm.image import GuestImage
from tmem_host.vm.launcher import (
    TMEM_CHARDEV_ID, TMEM_PORT_ID, TMEM_SERIAL_BUS_ID, VmConfig, ResolvedAccel, qemu_command,
)
from tmem_host.vm.recipe import REPO_ROOT

IMAGE = GuestImage(directory=Path("/img"), kernel=Path("/img/vmlinux"),
                   initrd=Path("/img/initrd.img"), probe_initrd=Path("/img/probe-initrd.img"),
                   rootfs=Path("/img/rootfs.ext4"), manifest={})
RUN = Path("/run-dir")
CONSOLE = RUN / "console.log"
NBD_SOCKET = Path("/tmemd/g1.nbd.sock")
TMEM_SOCKET = Path("/tmemd/g1.tmem.sock")
SSH_PORT = 40022
PUBLIC_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample tmem-testbed"
MONITOR_FD = 7


def build(accel: ResolvedAccel = "tcg", **config: Any) -> list[str]:
    """The argv for VmConfig(name="g1", **config), with the scratch disks Guest
    would have made for it."""
    guest_config = VmConfig(name="g1", **config)
    swap_disk = None if guest_config.swap in ("none", "nbd") else RUN / "swap.img"
    data_disk = RUN / "data.img" if guest_config.data_disk_mib > 0 and guest_config.data_disk_speed != "nbd" \
        else None
    return qemu_command(guest_config, accel=accel, image=IMAGE, console_log=CONSOLE,
                        ssh_port=SSH_PORT, ssh_public_key=PUBLIC_KEY, monitor_fd=MONITOR_FD,
                        swap_disk=swap_disk, data_disk=data_disk)


def values(argv: list[str], option: str) -> list[str]:
    """The value after each occurrence of `option`."""
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == option]


def props(value: str) -> dict[str, str]:
    """QEMU's "driver,key=value,..." as a dict (the leading bare word under "")."""
    parsed = {}
    for part in value.split(","):
        key, equals, item = part.partition("=")
        parsed[key if equals else ""] = item if equals else key
    return parsed


def devices(argv: list[str], driver: str) -> list[dict[str, str]]:
    return [props(v) for v in values(argv, "-device") if props(v)[""] == driver]


def drive(argv: list[str], drive_id: str) -> dict[str, str]:
    (found,) = [props(v) for v in values(argv, "-drive") if props(v).get("id") == drive_id]
    return found


# One of each kind of configuration the testbed boots (and the extras).
CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "bigmem": {"memory_mib": 1024, "vcpus": 2},
    "disk-hdd": {"swap": "hdd"},
    "disk-ssd": {"swap": "ssd"},
    "disk-hostcache": {"swap": "hostcache"},
    "tmem-blk": {"swap": "nbd", "nbd_socket": NBD_SOCKET, "nbd_export": "g1"},
    "tmem-agent": {"swap": "hdd", "tmem_socket": TMEM_SOCKET, "data_disk_mib": 64},
    "no-share": {"share_agent": False, "data_disk_mib": 64, "data_disk_speed": "hdd"},
    "extras": {"kernel_args": ["foo=1"], "qemu_args": ["-S"], "vsock_cid": 3,
               "kernel": Path("/k/vmlinuz")},
}


@pytest.mark.parametrize("accel", ["tcg", "kvm"])
@pytest.mark.parametrize("label", CONFIGS)
def test_every_configuration_keeps_the_invariants(label: str, accel: ResolvedAccel) -> None:
    config = CONFIGS[label]
    argv = build(accel, **config)
    assert argv[0] == "qemu-system-x86_64"
    # QMP over the socketpair end QEMU inherits, first thing on the line.
    assert argv[1:5] == ["-chardev", f"socket,id=mon,fd={MONITOR_FD}",
                         "-mon", "chardev=mon,mode=control"]
    assert values(argv, "-M") == ["q35"] and not any("microvm" in arg for arg in argv)
    assert values(argv, "-name") == ["g1"]
    assert {"-nodefaults", "-no-reboot"} <= set(argv) and values(argv, "-display") == ["none"]
    # Serial console into console.log (the launcher watches it for the ready marker).
    assert f"file,id=console,path={CONSOLE}" in values(argv, "-chardev")
    assert values(argv, "-serial") == ["chardev:console"]
    # User networking: nothing but SSH, forwarded from loopback only.
    (netdev,) = values(argv, "-netdev")
    assert netdev == f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{SSH_PORT}-:22"
    assert devices(argv, "virtio-net-pci") == [{"": "virtio-net-pci", "netdev": "n0"}]
    root = drive(argv, "root")
    assert root["file"] == str(IMAGE.rootfs) and root["snapshot"] == "on"
    assert argv == build(accel, **config)  # deterministic
    if config.get("qemu_args"):
        assert argv[-len(config["qemu_args"]):] == list(config["qemu_args"])


def test_tcg_is_q35_with_the_max_cpu() -> None:
    argv = build("tcg")
    assert argv[5:13] == ["-name", "g1", "-M", "q35", "-accel", "tcg", "-cpu", "max,-erms,-fsrm"]
    assert "kvm" not in argv and "host" not in argv


def test_kvm_is_q35_with_the_host_cpu() -> None:
    argv = build("kvm")
    assert argv[5:13] == ["-name", "g1", "-M", "q35", "-accel", "kvm", "-cpu", "host"]


def test_an_unresolved_accelerator_is_refused() -> None:
    with pytest.raises(ValueError, match="auto"):
        build("auto")  # type: ignore[arg-type]


def test_memory_and_cpus() -> None:
    argv = build(memory_mib=768, vcpus=3)
    assert values(argv, "-m") == ["768"] and values(argv, "-smp") == ["3"]
    argv = build()
    assert values(argv, "-m") == ["256"] and values(argv, "-smp") == ["1"]


def test_kernel_initrd_and_command_line() -> None:
    argv = build(kernel_args=["tmem.x=1", "nokaslr"])
    assert values(argv, "-kernel") == [str(IMAGE.kernel)]
    assert values(argv, "-initrd") == [str(IMAGE.initrd)]
    (append,) = values(argv, "-append")
    words = append.split(" ")
    assert words[:5] == ["console=ttyS0", "panic=-1", "quiet", "sysrq_always_enabled",
                         "tmem.hostname=g1"]
    assert words[-2:] == ["tmem.x=1", "nokaslr"]  # the config's own args come last
    (key,) = [w.removeprefix("tmem.ssh_key=") for w in words if w.startswith("tmem.ssh_key=")]
    assert base64.b64decode(key).decode() == PUBLIC_KEY
    assert values(build(kernel=Path("/k/vmlinuz")), "-kernel") == ["/k/vmlinuz"]


def test_no_swap_means_no_swap_disk() -> None:
    argv = build(swap="none")
    assert "-blockdev" not in argv
    assert not any("tmem-swap" in arg or "id=swap" in arg for arg in argv)


@pytest.mark.parametrize(("speed", "iops"), [("hdd", "200"), ("ssd", "4000"), ("hostcache", None)])
def test_scratch_swap_disk_is_throttled_by_speed(speed: str, iops: str | None) -> None:
    argv = build(swap=speed)
    swap = drive(argv, "swap")
    assert swap == {"file": str(RUN / "swap.img"), "if": "none", "id": "swap",
                    "format": "raw", **({"throttling.iops-total": iops} if iops else {})}
    assert {"": "virtio-blk-pci", "drive": "swap", "serial": "tmem-swap"} in \
        devices(argv, "virtio-blk-pci")


def test_nbd_swap_is_a_reconnecting_discarding_blockdev() -> None:
    argv = build(swap="nbd", nbd_socket=NBD_SOCKET, nbd_export="g1")
    (blockdev,) = [props(v) for v in values(argv, "-blockdev")]
    assert blockdev == {"driver": "nbd", "node-name": "swap", "discard": "unmap",
                        "server.type": "unix", "server.path": str(NBD_SOCKET),
                        "export": "g1", "reconnect-delay": "30"}
    assert {"": "virtio-blk-pci", "drive": "swap", "serial": "tmem-swap"} in \
        devices(argv, "virtio-blk-pci")
    assert not any(props(v).get("id") == "swap" for v in values(argv, "-drive"))


def test_a_cached_data_disk_is_tmemds_disk_export_not_a_scratch_file() -> None:
    disk_socket = Path("/tmemd/g1.disk.nbd.sock")
    argv = build(data_disk_mib=256, data_disk_speed="nbd", data_nbd_socket=disk_socket)
    (blockdev,) = [props(v) for v in values(argv, "-blockdev")]
    assert blockdev == {"driver": "nbd", "node-name": "data", "discard": "unmap",
                        "server.type": "unix", "server.path": str(disk_socket),
                        "export": "g1", "reconnect-delay": "30"}
    assert {"": "virtio-blk-pci", "drive": "data", "serial": "tmem-data"} in devices(argv, "virtio-blk-pci")
    assert not any(props(v).get("id") == "data" for v in values(argv, "-drive"))
    with pytest.raises(ValueError, match="data_nbd_socket"):
        build(data_disk_mib=256, data_disk_speed="nbd")


def test_nbd_swap_needs_socket_and_export() -> None:
    with pytest.raises(ValueError, match="nbd_socket and nbd_export"):
        build(swap="nbd", nbd_socket=NBD_SOCKET)


@pytest.mark.parametrize(("speed", "iops"), [("hdd", "200"), ("ssd", "4000"), ("hostcache", None)])
def test_data_disk_speed(speed: str, iops: str | None) -> None:
    argv = build(data_disk_mib=64, data_disk_speed=speed)
    data = drive(argv, "data")
    assert data["file"] == str(RUN / "data.img")
    assert data.get("throttling.iops-total") == iops
    assert {"": "virtio-blk-pci", "drive": "data", "serial": "tmem-data"} in \
        devices(argv, "virtio-blk-pci")
    assert not any("tmem-data" in arg for arg in build())


def test_scratch_disks_must_match_the_config() -> None:
    config = VmConfig(name="g1", swap="hdd")
    common: dict[str, Any] = {"accel": "tcg", "image": IMAGE, "console_log": CONSOLE,
                              "ssh_port": SSH_PORT, "ssh_public_key": PUBLIC_KEY,
                              "monitor_fd": MONITOR_FD}
    with pytest.raises(ValueError, match="swap_disk"):
        qemu_command(config, **common)
    with pytest.raises(ValueError, match="swap_disk"):
        qemu_command(VmConfig(name="g1"), swap_disk=RUN / "swap.img", **common)
    with pytest.raises(ValueError, match="data_disk"):
        qemu_command(VmConfig(name="g1", data_disk_mib=8), **common)


def test_tmem_channel_is_the_org_tmem_0_port() -> None:
    argv = build(tmem_socket=TMEM_SOCKET)
    assert devices(argv, "virtio-serial-pci") == [{"": "virtio-serial-pci",
                                                   "id": TMEM_SERIAL_BUS_ID}]
    # A client of tmemd's socket that reconnects within a second if tmemd restarts.
    assert props(values(argv, "-chardev")[-1]) == {
        "": "socket", "id": TMEM_CHARDEV_ID, "path": str(TMEM_SOCKET),
        "server": "off", "reconnect": "1"}
    # The ids Guest.remove_tmem_channel()/add_tmem_channel() address.
    assert devices(argv, "virtserialport") == [{
        "": "virtserialport", "id": TMEM_PORT_ID, "chardev": TMEM_CHARDEV_ID,
        "bus": f"{TMEM_SERIAL_BUS_ID}.0", "name": "org.tmem.0"}]
    plain = build()
    assert not devices(plain, "virtio-serial-pci") and not devices(plain, "virtserialport")


def test_vsock() -> None:
    assert devices(build(vsock_cid=5), "vhost-vsock-pci") == [
        {"": "vhost-vsock-pci", "guest-cid": "5"}]
    assert not devices(build(), "vhost-vsock-pci")


def test_agent_share_is_read_only_9p() -> None:
    shares = [props(v) for v in values(build(), "-virtfs")]
    assert shares == [{"": "local", "path": str(REPO_ROOT / directory), "mount_tag": tag,
                       "security_model": "none", "readonly": "on"}
                      for tag, directory in (("tmemguest", "guest"), ("tmemwire", "wire"))]
    assert "-virtfs" not in build(share_agent=False)


def test_qemu_args_and_binary() -> None:
    argv = build(qemu_args=["-S", "-d", "guest_errors"], qemu_binary="/opt/qemu/bin/qemu")
    assert argv[0] == "/opt/qemu/bin/qemu"
    assert argv[-3:] == ["-S", "-d", "guest_errors"]


def test_tmem_blk_guest_exactly() -> None:
    """The whole line of one typical guest: a change in order or spelling shows here."""
    argv = build(swap="nbd", nbd_socket=NBD_SOCKET, nbd_export="g1", tmem_socket=TMEM_SOCKET,
                 data_disk_mib=16, data_disk_speed="ssd")
    key = base64.b64encode(PUBLIC_KEY.encode()).decode()
    assert argv == [
        "qemu-system-x86_64", "-chardev", "socket,id=mon,fd=7", "-mon", "chardev=mon,mode=control",
        "-name", "g1", "-M", "q35", "-accel", "tcg", "-cpu", "max,-erms,-fsrm", "-m", "256", "-smp", "1",
        "-nodefaults", "-display", "none", "-no-reboot",
        "-chardev", "file,id=console,path=/run-dir/console.log", "-serial", "chardev:console",
        "-kernel", "/img/vmlinux", "-initrd", "/img/initrd.img",
        "-append", "console=ttyS0 panic=-1 quiet sysrq_always_enabled tmem.hostname=g1 "
                   f"tmem.ssh_key={key}",
        "-drive", "file=/img/rootfs.ext4,if=none,id=root,format=raw,snapshot=on",
        "-device", "virtio-blk-pci,drive=root,serial=tmem-root",
        "-netdev", "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:40022-:22",
        "-device", "virtio-net-pci,netdev=n0",
        "-blockdev", "driver=nbd,node-name=swap,discard=unmap,server.type=unix,"
                     "server.path=/tmemd/g1.nbd.sock,export=g1,reconnect-delay=30",
        "-device", "virtio-blk-pci,drive=swap,serial=tmem-swap",
        "-drive", "file=/run-dir/data.img,if=none,id=data,format=raw,throttling.iops-total=4000",
        "-device", "virtio-blk-pci,drive=data,serial=tmem-data",
        "-device", "virtio-serial-pci,id=tmemserial",
        "-chardev", "socket,id=tmem0,path=/tmemd/g1.tmem.sock,server=off,reconnect=1",
        "-device", "virtserialport,id=tmemport,chardev=tmem0,bus=tmemserial.0,name=org.tmem.0",
        "-virtfs", f"local,path={REPO_ROOT / 'guest'},mount_tag=tmemguest,"
                   "security_model=none,readonly=on",
        "-virtfs", f"local,path={REPO_ROOT / 'wire'},mount_tag=tmemwire,"
                   "security_model=none,readonly=on",
    ]


def test_no_io(monkeypatch: pytest.MonkeyPatch) -> None:
    """No process, socket or file is touched (the made-up paths would fail anyway)."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("qemu_command did I/O")

    with monkeypatch.context() as patch:
        for owner, name in ((subprocess, "Popen"), (socket, "socket"), (builtins, "open"),
                            (Path, "open"), (Path, "exists"), (Path, "is_file"),
                            (Path, "stat")):
            patch.setattr(owner, name, refuse)
        for config in CONFIGS.values():
            build(**config)


def test_balloon() -> None:
    assert devices(build(balloon=True), "virtio-balloon-pci") == [
        {"": "virtio-balloon-pci", "id": "balloon0", "deflate-on-oom": "on"}]
    assert not devices(build(), "virtio-balloon-pci")
