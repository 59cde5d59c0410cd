"""Boot a tmem guest in QEMU and talk to it: SSH, QMP, the serial console.

    config = VmConfig(name="g1", memory_mib=256, swap="nbd",
                      nbd_socket=run / "g1.nbd.sock", nbd_export="g1",
                      tmem_socket=run / "g1.tmem.sock")
    with Guest(config) as guest:          # start() + wait_ready()
        print(guest.ssh("free -m").stdout)
        guest.qmp("query-status")         # -> {"status": "running", ...}

Each guest has a run directory (console.log, qemu-stderr.log, qmp.log, the SSH
key, and while it runs its scratch swap and data disks). Disks carry virtio-blk serials (tmem-root, tmem-swap,
tmem-data) for guest code to find them via /sys/block/*/serial. The agent
source (guest/, wire/) is shared read-only over 9p and is on the guest's
Python path. QEMU runs in its own process group with PR_SET_PDEATHSIG, and an
atexit hook kills what is left, so no QEMU outlives the process that started it.
Start guests from a thread that lives as long as they do: the death signal
follows the thread that forked QEMU.
qemu_command() builds QEMU's command line without I/O; Guest does the I/O
(sockets, accelerator, port, scratch disks) and passes the results in.
"""
from __future__ import annotations

import asyncio
import atexit
import base64
import ctypes
import io
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError

from tmem_host.vm import accel as accel_probe
from tmem_host.vm.image import GuestImage, ImageError, require_image
from tmem_host.vm.recipe import READY_MARKER, REPO_ROOT
from tmem_wire.agent import DISK_SERIALS, PORT_NAME as TMEM_PORT_NAME

# paramiko's transport thread logs every failed handshake with a traceback (a guest
# squeezed by its balloon or swapping to a throttled disk may not answer SSH for a
# while); the launcher retries and raises SshTimeoutError naming the last error, so
# those lines are noise in a run's terminal.
logging.getLogger("paramiko.transport").setLevel(logging.CRITICAL)

Accel = Literal["auto", "kvm", "tcg"]
ResolvedAccel = Literal["kvm", "tcg"]  # what "auto" became: what qemu_command() takes
SwapKind = Literal["none", "hdd", "ssd", "hostcache", "nbd"]
DiskSpeed = Literal["hdd", "ssd", "hostcache"]
# A data disk is a scratch file of a speed class, or "nbd": tmemd's cached disk
# (the image is tmemd's, read through the guest's ephemeral pool: nbd.readcache).
DataDisk = Literal["hdd", "ssd", "hostcache", "nbd"]
QEMU_BINARY = "qemu-system-x86_64"
# Seconds QEMU's NBD client holds requests while tmemd restarts (docs/RELIABILITY.md).
NBD_RECONNECT_DELAY_S = 30
# Disk speed classes (swap and data disks): a 200-IOPS spinning disk, a
# few-thousand-IOPS SSD; "hostcache" is unthrottled.
DISK_IOPS: dict[str, int] = {"hdd": 200, "ssd": 4000}
# QEMU ids of the tmem channel's pieces: Guest.remove_tmem_channel() and
# add_tmem_channel() address them.
TMEM_SERIAL_BUS_ID = "tmemserial"
TMEM_PORT_ID = "tmemport"
TMEM_CHARDEV_ID = "tmem0"
AGENT_SHARES = {"tmemguest": REPO_ROOT / "guest", "tmemwire": REPO_ROOT / "wire"}
PANIC_PATTERNS = (b"Kernel panic - not syncing", b"tmem-initramfs: ")
HOSTFWD_FAILURE = "Could not set up host forwarding rule"
PANIC_WINDOW_BYTES = 128  # console bytes kept so a pattern split across reads matches
LOG_TAIL_LINES = 20
PR_SET_PDEATHSIG = 1
# TCG boots in 8-15 s here but the host is shared and noisy: generous defaults.
BOOT_TIMEOUT_S = {"tcg": 180.0, "kvm": 60.0}
SOFT_SHUTDOWN_TIMEOUT_S = 30.0
# How long Guest.ssh waits for the channel's EOF once the exit status is in (the
# rest of the output may follow it); a command whose background child keeps its
# pipes open returns after this.
SSH_EOF_GRACE_S = 5.0
QUIT_TIMEOUT_S = 10.0
QUIET_CONSOLE_LOGLEVEL = "4"  # what the kernel's `quiet` sets


class LauncherError(Exception):
    """Root of every launcher failure.

    LauncherError
    ├── VmConfigError           the configuration cannot work (checked before QEMU starts)
    │   ├── MissingImageError   kernel, initrd or root image missing
    │   └── SocketNotListeningError  tmemd's channel or NBD socket refuses connections
    ├── QemuError               QEMU misbehaved: the message carries its exit code,
    │   │                       command line, stderr and console tails
    │   ├── QemuExitedError     QEMU exited when it should be running
    │   ├── GuestPanicError     the guest kernel panicked (seen on the console)
    │   ├── BootTimeoutError    no readiness marker or SSH within the boot timeout
    │   └── QmpError            a QMP command failed
    └── SshError                SSH connection or transfer failed
        ├── SshTimeoutError     a command outlived its timeout
        └── CommandFailedError  a command exited non-zero under check=True (.result)
    """


class VmConfigError(LauncherError):
    pass


class MissingImageError(VmConfigError):
    pass


class SocketNotListeningError(VmConfigError):
    pass


class QemuError(LauncherError):
    pass


class QemuExitedError(QemuError):
    pass


class GuestPanicError(QemuError):
    pass


class BootTimeoutError(QemuError):
    pass


class QmpError(QemuError):
    pass


class SshError(LauncherError):
    pass


class SshTimeoutError(SshError):
    pass


@dataclass(frozen=True, slots=True)
class CommandResult:
    command: str
    exit_status: int
    stdout: str
    stderr: str


class CommandFailedError(SshError):
    def __init__(self, result: CommandResult) -> None:
        super().__init__(
            f"guest command {result.command!r} exited {result.exit_status}\n"
            f"stdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-2000:]}"
        )
        self.result = result


BALLOON_DEVICE_ID = "balloon0"  # QOM path /machine/peripheral/balloon0


@dataclass(slots=True)
class VmConfig:
    """What to boot. Sizes in MiB; socket paths must be listening before start()."""

    name: str
    memory_mib: int = 256
    vcpus: int = 1
    accel: Accel = "auto"
    swap: SwapKind = "none"
    swap_mib: int = 512
    nbd_socket: Path | None = None  # swap="nbd": tmemd's DIR/NAME.nbd.sock
    nbd_export: str | None = None  # swap="nbd": the export name (the guest's name)
    data_disk_mib: int = 0  # 0: no data disk
    data_disk_speed: DataDisk = "hostcache"  # hdd/ssd throttled as swap; hostcache: unthrottled
    data_nbd_socket: Path | None = None  # data_disk_speed="nbd": tmemd's DIR/NAME.disk.nbd.sock
    tmem_socket: Path | None = None  # tmemd's DIR/NAME.tmem.sock: adds org.tmem.0
    vsock_cid: int | None = None  # needs /dev/vhost-vsock
    share_agent: bool = True  # 9p-share guest/ and wire/ at /opt/tmem
    run_dir: Path | None = None  # default: a new directory under the system temp dir
    image: GuestImage | None = None  # default: the cached image of the current recipe
    kernel: Path | None = None  # overrides the image's kernel
    kernel_args: Sequence[str] = ()
    qemu_args: Sequence[str] = ()  # appended verbatim
    boot_timeout: float | None = None  # default by accelerator
    qemu_binary: str = QEMU_BINARY
    # Live migration (Guest.migrate_to): both QEMUs open one qcow2 overlay of the
    # root image (create_root_overlay) instead of snapshot=on; the destination
    # waits on `incoming` (-incoming URI, paused: -S) and reuses the source's SSH
    # key, so that its command line is the source's but for its sockets.
    root_overlay: Path | None = None
    incoming: str | None = None
    ssh_key_from: Path | None = None
    # The scratch swap and data disks live here and outlive the QEMU (the
    # migration's other QEMU opens the same files); None: fresh ones in run_dir.
    shared_disk_dir: Path | None = None
    # A virtio-balloon device (BALLOON_DEVICE_ID; tmem_host.vm.balloon drives it),
    # deflate-on-oom: a guest the host squeezed too hard takes memory back rather
    # than kill a process.
    balloon: bool = False


@dataclass(slots=True)
class BootTimes:
    """Seconds from QEMU's start (wall clock on the host)."""

    marker: float | None = None  # the init's readiness line on the console
    ssh: float | None = None  # first successful SSH login
    guest_uptime: float | None = None  # the guest's own uptime at the marker


@dataclass(slots=True)
class ShutdownResult:
    exit_code: int | None
    method: Literal["poweroff", "quit", "kill", "exited"]


_LIVE_GUESTS: set[Guest] = set()


@atexit.register
def _kill_live_guests() -> None:
    for guest in list(_LIVE_GUESTS):
        guest.kill()


def _set_parent_death_signal() -> None:
    """In the forked child: die with the parent (thread) that started QEMU."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def free_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def check_listening(path: Path, what: str) -> None:
    """Fail before QEMU starts if nothing accepts connections on a unix socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(5.0)
        try:
            probe.connect(str(path))
        except OSError as error:
            raise SocketNotListeningError(
                f"{what} {path} is not listening ({error.strerror or error}): "
                "start tmemd first (python -m tmem_host.daemon.main --run-dir DIR --guest NAME)"
            ) from error


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_bytes().decode(errors="replace")
    except OSError:
        return "(missing)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


# The emulated CPU: every feature TCG has but "enhanced REP MOVSB/STOSB". With
# ERMS the guest kernel's memcpy, copy_to/from_user and clear_page, and glibc's
# large memcpy, are `rep movsb`/`rep stosb`, which QEMU 7.2's TCG runs one byte
# per translated-block pass; without it they use 8- and 16-byte moves. Measured
# (docs/ARCHITECTURE.md, "The emulated CPU"): usemem's first touch of 128 MiB
# 8.8 s -> 4.3 s, dd of 64 MiB through the page cache 0.63 s -> 0.31 s.
TCG_CPU_MODEL: Final = "max,-erms,-fsrm"


def qemu_command(
    config: VmConfig, *, accel: ResolvedAccel, image: GuestImage, console_log: Path,
    ssh_port: int, ssh_public_key: str, monitor_fd: int,
    swap_disk: Path | None = None, data_disk: Path | None = None,
) -> list[str]:
    """QEMU's argv for `config`: pure (no I/O), so it is tested without booting.

    Guest does the I/O and passes the results in: the accelerator it resolved,
    the free port forwarded to the guest's SSH, the OpenSSH public key line
    ("TYPE BASE64 COMMENT") the guest's init authorizes, QEMU's end of the QMP
    socketpair (inherited as `monitor_fd`), and the fresh sparse files for a
    scratch swap disk (swap hdd/ssd/hostcache) and a data disk (data_disk_mib > 0).
    """
    if accel not in ("kvm", "tcg"):
        raise ValueError(f"accel must be resolved to kvm or tcg, not {accel!r}")
    if (swap_disk is None) != (config.swap in ("none", "nbd")):
        raise ValueError(f"swap={config.swap!r} and swap_disk={swap_disk} do not match")
    if (data_disk is None) != (config.data_disk_mib <= 0 or config.data_disk_speed == "nbd"):
        raise ValueError(f"data_disk_mib={config.data_disk_mib} and data_disk={data_disk} "
                         "do not match")
    kernel_args = [
        # sysrq_always_enabled: Guest.sysrq() works even when the guest is stuck.
        "console=ttyS0", "panic=-1", "quiet", "sysrq_always_enabled",
        f"tmem.hostname={config.name}",
        "tmem.ssh_key=" + base64.b64encode(ssh_public_key.encode()).decode(),
        *config.kernel_args,
    ]
    cpu = ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else ["-accel", "tcg", "-cpu", TCG_CPU_MODEL]
    command = [
        # QMP over the socketpair end QEMU inherits: no socket path to race for or clean up.
        config.qemu_binary, "-chardev", f"socket,id=mon,fd={monitor_fd}",
        "-mon", "chardev=mon,mode=control",
        "-name", config.name, "-M", "q35", *cpu,
        "-m", str(config.memory_mib), "-smp", str(config.vcpus),
        "-nodefaults", "-display", "none", "-no-reboot",
        "-chardev", f"file,id=console,path={console_log}", "-serial", "chardev:console",
        "-kernel", str(config.kernel or image.kernel), "-initrd", str(image.initrd),
        "-append", " ".join(kernel_args),
        # snapshot=on: guests share the cached root image and never change it
        # (a migration's two QEMUs share an overlay of it instead).
        "-drive", (f"file={config.root_overlay},if=none,id=root,format=qcow2"
                   if config.root_overlay is not None else
                   f"file={image.rootfs},if=none,id=root,format=raw,snapshot=on"),
        "-device", f"virtio-blk-pci,drive=root,serial={DISK_SERIALS['root']}",
        # restrict=on: no way out of the guest but the SSH port, bound to loopback only.
        "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{ssh_port}-:22",
        "-device", "virtio-net-pci,netdev=n0",
    ]
    if config.swap == "nbd":
        if config.nbd_socket is None or not config.nbd_export:
            raise ValueError("swap='nbd' needs nbd_socket and nbd_export")
        command += _nbd_disk_args("swap", config.nbd_socket, config.nbd_export)
    elif swap_disk is not None:
        command += _scratch_disk_args("swap", swap_disk, config.swap)
    if config.data_disk_speed == "nbd" and config.data_disk_mib > 0:
        if config.data_nbd_socket is None:
            raise ValueError("data_disk_speed='nbd' needs data_nbd_socket")
        command += _nbd_disk_args("data", config.data_nbd_socket, config.name)
    elif data_disk is not None:
        command += _scratch_disk_args("data", data_disk, config.data_disk_speed)
    if config.tmem_socket is not None:
        command += ["-device", f"virtio-serial-pci,id={TMEM_SERIAL_BUS_ID}",
                    "-chardev", f"socket,id={TMEM_CHARDEV_ID},path={config.tmem_socket},"
                                "server=off,reconnect=1",
                    "-device", f"virtserialport,id={TMEM_PORT_ID},chardev={TMEM_CHARDEV_ID},"
                               f"bus={TMEM_SERIAL_BUS_ID}.0,name={TMEM_PORT_NAME}"]
    if config.vsock_cid is not None:
        command += ["-device", f"vhost-vsock-pci,guest-cid={config.vsock_cid}"]
    if config.balloon:
        command += ["-device", f"virtio-balloon-pci,id={BALLOON_DEVICE_ID},deflate-on-oom=on"]
    if config.share_agent:
        for tag, path in AGENT_SHARES.items():
            command += ["-virtfs", f"local,path={path},mount_tag={tag},"
                                   "security_model=none,readonly=on"]
    if config.incoming is not None:
        command += ["-incoming", config.incoming, "-S"]
    return command + list(config.qemu_args)


def create_root_overlay(path: Path, image: GuestImage | None = None) -> Path:
    """A qcow2 overlay of the cached root image at ``path``: the root disk both
    QEMUs of a live migration open (QEMU hands its write lock over at the switch)."""
    rootfs = (image or require_image()).rootfs
    result = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(rootfs),
                             str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        raise VmConfigError(f"qemu-img create {path} exited {result.returncode}: {result.stderr.strip()}")
    return path


def _nbd_disk_args(role: str, socket_path: Path, export: str) -> list[str]:
    """Disk `role` (swap, data) on one of tmemd's NBD exports.

    discard=unmap: the guest's discards (swapon --discard, fstrim) reach tmemd as
    NBD TRIM, so freed slots are flushed from tmem. reconnect-delay: if tmemd
    dies, QEMU reconnects and reruns the requests in flight for this long instead
    of failing them (EIO in the guest); a restarted tmemd has the swap pages back
    from its journal (a cached disk starts with an empty cache)."""
    return ["-blockdev", f"driver=nbd,node-name={role},discard=unmap,server.type=unix,"
                         f"server.path={socket_path},export={export},"
                         f"reconnect-delay={NBD_RECONNECT_DELAY_S}",
            "-device", f"virtio-blk-pci,drive={role},serial={DISK_SERIALS[role]}"]


def _scratch_disk_args(role: str, path: Path, speed: str) -> list[str]:
    """Scratch disk `role` (swap, data) in a speed class: hdd and ssd are throttled
    to their IOPS; hostcache is unthrottled (the host page cache absorbs it)."""
    throttle = f",throttling.iops-total={DISK_IOPS[speed]}" if speed in DISK_IOPS else ""
    return ["-drive", f"file={path},if=none,id={role},format=raw{throttle}",
            "-device", f"virtio-blk-pci,drive={role},serial={DISK_SERIALS[role]}"]


class Guest:
    """One QEMU guest. A context manager: boots on entry, shuts down on exit."""

    def __init__(self, config: VmConfig) -> None:
        self.config = config
        self.run_dir = config.run_dir or Path(tempfile.mkdtemp(prefix=f"tmem-{config.name}-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.console_log = self.run_dir / "console.log"
        self.stderr_log = self.run_dir / "qemu-stderr.log"
        self.qmp_log = self.run_dir / "qmp.log"
        self.key_path = self.run_dir / "ssh_key"
        self.accel: ResolvedAccel | None = None
        self.ssh_port: int | None = None
        self.command: list[str] = []
        self.boot_times = BootTimes()
        self.exit_code: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0
        self._ssh_key = self._make_ssh_key()
        self._ssh: paramiko.SSHClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._qmp_client: QMPClient | None = None
        self._qmp_log_lock = threading.Lock()
        self._event_task: asyncio.Task[None] | None = None
        self._monitor_socket: socket.socket | None = None
        self._console_offset = 0
        self._console_tail = b""
        self._scratch_disks: list[Path] = []

    # -- lifecycle ------------------------------------------------------------

    def __enter__(self) -> Guest:
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if kind is None:
            self.shutdown()
        else:
            self.kill()

    def start(self) -> None:
        """Check the configuration, start QEMU and connect QMP (does not wait for boot)."""
        if self._process is not None:
            raise VmConfigError(f"guest {self.config.name} already started")
        image = self._check_config()
        try:
            for attempt in range(3):
                self.ssh_port = free_local_port()
                self._spawn(image)
                try:
                    self._connect_qmp()
                    return
                except QemuExitedError:
                    # Another process may have taken the forwarded port in between.
                    if attempt < 2 and HOSTFWD_FAILURE in tail(self.stderr_log):
                        self.kill()
                        self._process = None
                        continue
                    raise
        except BaseException:
            self.kill()
            raise

    def wait_ready(self, timeout: float | None = None) -> BootTimes:
        """Wait for the console marker, then for an SSH login; returns the boot times."""
        assert self.accel is not None
        timeout = timeout or self.config.boot_timeout or BOOT_TIMEOUT_S[self.accel]
        deadline = self._started_at + timeout
        while True:
            self._check_alive()
            console = self._console_bytes()
            marker = console.find(READY_MARKER.encode())
            if marker >= 0:
                break
            if time.monotonic() > deadline:
                raise self._error(BootTimeoutError, f"no {READY_MARKER} on the console "
                                  f"within {timeout:.0f} s")
            time.sleep(0.1)
        self.boot_times.marker = time.monotonic() - self._started_at
        line = console[marker:].split(b"\n", 1)[0].decode(errors="replace")
        uptime = re.search(r"uptime=([0-9.]+)", line)
        self.boot_times.guest_uptime = float(uptime.group(1)) if uptime else None
        self._connect_ssh(deadline)
        self.boot_times.ssh = time.monotonic() - self._started_at
        return self.boot_times

    def shutdown(self) -> ShutdownResult:
        """poweroff over SSH, then QMP quit, then SIGKILL; each step with a timeout."""
        process = self._process
        if process is None:
            return ShutdownResult(self.exit_code, "exited")
        method: Literal["poweroff", "quit", "kill", "exited"] = "exited"
        try:
            if process.poll() is None and self._ssh is not None:
                method = "poweroff"
                self._request_poweroff()
                self._wait_exit(SOFT_SHUTDOWN_TIMEOUT_S)
            if process.poll() is None and self._qmp_client is not None:
                method = "quit"
                try:
                    self.qmp("quit")
                except LauncherError:
                    pass
                self._wait_exit(QUIT_TIMEOUT_S)
            if process.poll() is None:
                method = "kill"
        finally:
            self.kill()
        return ShutdownResult(self.exit_code, method)

    def kill(self) -> None:
        """Kill QEMU's process group at once and release everything (idempotent)."""
        process = self._process
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if process is not None:
            process.wait()
            self.exit_code = process.returncode
        for disk in self._scratch_disks:
            disk.unlink(missing_ok=True)
        self._cleanup()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def console_text(self) -> str:
        return self._console_bytes().decode(errors="replace")

    def _console_bytes(self) -> bytes:
        try:
            return self.console_log.read_bytes()
        except FileNotFoundError:
            return b""

    # -- SSH ------------------------------------------------------------------

    def ssh(self, command: str, timeout: float = 60.0, check: bool = True,
            input: bytes | None = None) -> CommandResult:
        """Run a shell command as root; raises CommandFailedError on non-zero if check.

        On SshTimeoutError the channel is closed, but the command may live on in the guest.
        """
        transport = self._transport()
        channel = transport.open_session()
        stdout, stderr = bytearray(), bytearray()
        try:
            channel.exec_command(command)
            if input is not None:
                channel.sendall(input)
            channel.shutdown_write()
            deadline = time.monotonic() + timeout
            eof_wait_until: float | None = None
            while True:
                while channel.recv_ready():
                    stdout += channel.recv(65536)
                while channel.recv_stderr_ready():
                    stderr += channel.recv_stderr(65536)
                if channel.exit_status_ready() and not (
                        channel.recv_ready() or channel.recv_stderr_ready()):
                    # sshd may send the exit status before the rest of the output (it
                    # reads the child's pipes after reaping it, late on a loaded guest):
                    # done at EOF, or after a grace should a background child hold the
                    # pipes open. Breaking at the status once read a whole file as "".
                    if channel.eof_received:
                        break
                    now = time.monotonic()
                    if eof_wait_until is None:
                        eof_wait_until = now + SSH_EOF_GRACE_S
                    elif now > eof_wait_until:
                        break
                if time.monotonic() > deadline:
                    raise SshTimeoutError(
                        f"guest command {command!r} still running after {timeout} s\n"
                        f"stdout so far: {bytes(stdout[-2000:]).decode(errors='replace')}\n"
                        f"stderr so far: {bytes(stderr[-2000:]).decode(errors='replace')}")
                self._check_alive()
                if channel.closed and not channel.exit_status_ready():
                    raise SshError(f"guest {self.config.name}: the SSH connection closed "
                                   f"while {command!r} ran")
                if eof_wait_until is None:
                    channel.status_event.wait(0.05)
                else:
                    time.sleep(0.01)  # the status event is set: waiting on it would spin
            result = CommandResult(command, channel.recv_exit_status(),
                                   stdout.decode(errors="replace"),
                                   stderr.decode(errors="replace"))
        finally:
            channel.close()
        if check and result.exit_status != 0:
            raise CommandFailedError(result)
        return result

    def put_file(self, local: Path, remote: str) -> None:
        """Copy a host file into the guest over SFTP."""
        with self._sftp() as sftp:
            try:
                sftp.put(str(local), remote)
            except OSError as error:
                raise SshError(f"put {local} -> {self.config.name}:{remote}: {error}") from error

    def get_file(self, remote: str, local: Path) -> None:
        """Copy a guest file to the host over SFTP."""
        with self._sftp() as sftp:
            try:
                sftp.get(remote, str(local))
            except OSError as error:
                raise SshError(f"get {self.config.name}:{remote} -> {local}: {error}") from error

    def ssh_command_line(self) -> str:
        """A command a human can paste to log in (debugging)."""
        return (f"ssh -i {self.key_path} -p {self.ssh_port} -o StrictHostKeyChecking=no "
                "-o UserKnownHostsFile=/dev/null root@127.0.0.1")

    # -- QMP ------------------------------------------------------------------

    def qmp(self, command: str, arguments: Mapping[str, object] | None = None,
            **keyword_arguments: object) -> Any:
        """Execute a QMP command; returns its "return" value, raises QmpError."""
        client = self._qmp_client
        if client is None:
            raise self._error(QmpError, f"QMP {command}: not connected")
        merged = {**(arguments or {}), **keyword_arguments}
        self._log_qmp("->", {"execute": command, "arguments": merged})
        try:
            reply = self._in_loop(client.execute(command, merged or None), timeout=60.0)
        except ExecuteError as error:
            self._log_qmp("<-", {"error": str(error)})
            raise self._error(QmpError, f"QMP {command} failed: {error}") from error
        except (QMPError, OSError, EOFError, TimeoutError) as error:
            raise self._error(QmpError, f"QMP {command}: {error!r}") from error
        self._log_qmp("<-", {"return": reply})
        return reply

    # -- live migration -------------------------------------------------------

    def migrate(self, uri: str, timeout: float = 600.0, *, max_bandwidth: int = 4 << 30,
                downtime_limit_ms: int = 1000) -> dict[str, Any]:
        """Migrate this guest's state to ``uri`` (QMP ``migrate``: a QEMU waiting
        with -incoming, or ``exec:cat > FILE`` to save it) and wait until QEMU
        reports it completed (this QEMU is then stopped); returns QEMU's last
        ``query-migrate`` (total-time, downtime, ram.transferred, ...). QemuError
        if it failed."""
        self.qmp("migrate-set-parameters", {"max-bandwidth": max_bandwidth,
                                            "downtime-limit": downtime_limit_ms})
        self.qmp("migrate", uri=uri)
        deadline = time.monotonic() + timeout
        while True:
            info: dict[str, Any] = self.qmp("query-migrate")
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                raise self._error(QemuError, f"migration {status}: {info.get('error-desc', info)}")
            if time.monotonic() > deadline:
                self.qmp("migrate_cancel")
                raise self._error(QemuError, f"migration not completed in {timeout:.0f} s: {info}")
            time.sleep(0.2)

    def migrate_to(self, destination: Guest, timeout: float = 600.0, **parameters: int) -> dict[str, Any]:
        """Live-migrate this guest to ``destination`` (started with ``incoming``);
        see ``migrate``. The destination is then paused: ``resume_migrated``."""
        uri = destination.config.incoming
        if uri is None:
            raise VmConfigError(f"guest {destination.config.name}: not started with incoming=URI")
        info = self.migrate(uri, timeout, **parameters)
        destination.wait_loaded(time.monotonic() + timeout)
        return info

    def wait_loaded(self, deadline: float) -> None:
        """A guest started with ``incoming``: wait until QEMU has loaded its state."""
        while self.qmp("query-status").get("status") == "inmigrate":
            if time.monotonic() > deadline:
                raise self._error(QemuError, "the incoming state did not load in time")
            time.sleep(0.1)

    def resume_migrated(self, timeout: float = 120.0) -> None:
        """A guest started with ``incoming``, once its state is in: run it, log in over SSH."""
        deadline = time.monotonic() + timeout
        self.wait_loaded(deadline)
        self.qmp("cont")
        self._connect_ssh(deadline)

    def remove_tmem_channel(self, timeout: float = 30.0) -> None:
        """Hot-unplug the guest's org.tmem.0 port and remove its chardev (which
        drops the connection to tmemd). The port is gone once QEMU reports
        DEVICE_DELETED; only then is the chardev free to remove."""
        self._in_loop(self._delete_device(TMEM_PORT_ID), timeout)
        self.qmp("chardev-remove", id=TMEM_CHARDEV_ID)

    def add_tmem_channel(self) -> None:
        """Plug the org.tmem.0 port back in: the chardev (connecting to tmemd's
        socket, reconnecting as at boot), then the port on the same bus."""
        socket_path = self.config.tmem_socket
        if socket_path is None:
            raise self._error(VmConfigError, "this guest has no tmem channel")
        self.qmp("chardev-add", id=TMEM_CHARDEV_ID, backend={"type": "socket", "data": {
            "addr": {"type": "unix", "data": {"path": str(socket_path)}},
            "server": False, "reconnect": 1}})
        self.qmp("device_add", driver="virtserialport", id=TMEM_PORT_ID,
                 chardev=TMEM_CHARDEV_ID, bus=f"{TMEM_SERIAL_BUS_ID}.0", name=TMEM_PORT_NAME)

    async def _delete_device(self, device_id: str) -> None:
        """device_del, then wait for its DEVICE_DELETED (listening before asking)."""
        client = self._qmp_client
        if client is None:
            raise self._error(QmpError, f"device_del {device_id}: not connected")
        deleted = EventListener("DEVICE_DELETED", lambda event: (
            isinstance(data := event.get("data"), dict) and data.get("device") == device_id))
        with client.listen(deleted):
            self._log_qmp("->", {"execute": "device_del", "arguments": {"id": device_id}})
            try:
                await client.execute("device_del", {"id": device_id})
            except ExecuteError as error:
                raise self._error(QmpError, f"QMP device_del {device_id} failed: {error}") \
                    from error
            await deleted.get()

    def sysrq(self, key: str, settle: float = 3.0) -> str:
        """Press Alt-SysRq-KEY on the guest's keyboard (QMP send-key: works while the
        guest is too stuck for SSH) and return what it printed on the console within
        `settle` seconds. "w": blocked tasks, "t": all task states, "m": memory."""
        before = len(self._console_bytes())
        # The console log level goes to 9 around the key: `quiet` hides the dumps.
        for pressed in ("9", key, QUIET_CONSOLE_LOGLEVEL):
            self.qmp("send-key", keys=[{"type": "qcode", "data": code}
                                       for code in ("alt", "sysrq", pressed)])
            if pressed == key:
                time.sleep(settle)
        return self._console_bytes()[before:].decode(errors="replace")

    def forward_port(self, guest_port: int) -> int:
        """Forward a free loopback port of the host to ``guest_port`` in the guest
        (user networking's hostfwd, added at run time over the monitor) and return
        it: how a load generator on the host reaches a server in the guest. Bound
        to 127.0.0.1 only, like SSH."""
        for _ in range(3):
            port = free_local_port()
            # HMP has no QMP twin for hostfwd_add; it answers "" or the failure text.
            answer = self.qmp("human-monitor-command",
                              {"command-line": f"hostfwd_add n0 tcp:127.0.0.1:{port}-:{guest_port}"})
            if not answer.strip():
                return port
            if HOSTFWD_FAILURE not in answer:  # not a port race: say what QEMU said
                break
        raise self._error(QmpError, f"hostfwd_add for guest port {guest_port} failed: {answer.strip()}")

    # -- internals ------------------------------------------------------------

    def _check_config(self) -> GuestImage:
        config = self.config
        if shutil.which(config.qemu_binary) is None:
            raise VmConfigError(f"{config.qemu_binary} not found: apt-get install qemu-system-x86")
        try:
            image = config.image or require_image()
        except ImageError as error:
            raise MissingImageError(str(error)) from error
        for what, path in (("kernel", config.kernel or image.kernel), ("initrd", image.initrd),
                           ("root image", image.rootfs)):
            if not path.is_file():
                raise MissingImageError(f"guest {what} {path} does not exist "
                                        "(run `make image` to build the guest image)")
        if config.swap == "nbd":
            if config.nbd_socket is None or not config.nbd_export:
                raise VmConfigError("swap='nbd' needs nbd_socket and nbd_export")
            check_listening(config.nbd_socket, "the NBD export socket")
        if config.tmem_socket is not None:
            check_listening(config.tmem_socket, "the tmem channel socket")
        if config.vsock_cid is not None and not Path("/dev/vhost-vsock").exists():
            raise VmConfigError("vsock requested but /dev/vhost-vsock does not exist")
        self.accel = self._resolve_accel(image)
        return image

    def _resolve_accel(self, image: GuestImage) -> ResolvedAccel:
        if self.config.accel == "tcg":
            return "tcg"
        if self.config.accel == "kvm":
            if not os.access("/dev/kvm", os.R_OK | os.W_OK):
                raise VmConfigError("accel='kvm' but /dev/kvm is not usable")
            return "kvm"
        return accel_probe.verdict(image).accel

    def _sparse_file(self, name: str, size_mib: int) -> Path:
        """A fresh scratch disk; kill() deletes it once QEMU is gone (it can grow to
        its full size, and every boot makes a new one). In ``shared_disk_dir`` it
        is made once, kept, and opened as it is by the next QEMU (a migration's)."""
        shared = self.config.shared_disk_dir
        if shared is not None:
            path = shared / name
            if not path.exists():
                shared.mkdir(parents=True, exist_ok=True)
                with path.open("xb") as sparse:
                    sparse.truncate(size_mib << 20)
            return path
        path = self.run_dir / name
        self._scratch_disks.append(path)
        with path.open("wb") as sparse:
            sparse.truncate(size_mib << 20)
        return path

    def _make_scratch_disks(self) -> tuple[Path | None, Path | None]:
        """Fresh swap and data disks for this start (kill() deleted any earlier ones)."""
        config = self.config
        swap = None if config.swap in ("none", "nbd") else \
            self._sparse_file("swap.img", config.swap_mib)
        data = self._sparse_file("data.img", config.data_disk_mib) \
            if config.data_disk_mib > 0 and config.data_disk_speed != "nbd" else None
        return swap, data

    def _spawn(self, image: GuestImage) -> None:
        assert self.accel is not None and self.ssh_port is not None
        swap_disk, data_disk = self._make_scratch_disks()
        monitor_ours, monitor_qemu = socket.socketpair()
        self._monitor_socket = monitor_ours
        fd = monitor_qemu.fileno()
        public_key = f"{self._ssh_key.get_name()} {self._ssh_key.get_base64()} tmem-testbed"
        self.command = qemu_command(
            self.config, accel=self.accel, image=image, console_log=self.console_log,
            ssh_port=self.ssh_port, ssh_public_key=public_key, monitor_fd=fd,
            swap_disk=swap_disk, data_disk=data_disk)
        self.console_log.unlink(missing_ok=True)
        self._console_offset = 0
        self._console_tail = b""
        with self.stderr_log.open("wb") as stderr_file:
            stderr_file.write(f"$ {shlex.join(self.command)}\n".encode())
            stderr_file.flush()
            self._started_at = time.monotonic()
            self._process = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=stderr_file, stderr=stderr_file,
                pass_fds=(fd,), start_new_session=True, preexec_fn=_set_parent_death_signal,
            )
        monitor_qemu.close()
        _LIVE_GUESTS.add(self)

    def _connect_qmp(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever,
                                             name=f"qmp-{self.config.name}", daemon=True)
        self._loop_thread.start()
        self._qmp_client = QMPClient(self.config.name)
        assert self._monitor_socket is not None
        try:
            self._in_loop(self._qmp_client.connect(self._monitor_socket), timeout=30.0)
        except (QMPError, OSError, EOFError, TimeoutError) as error:
            self._wait_exit(2.0)
            if self._process is not None and self._process.poll() is not None:
                raise self._error(QemuExitedError, "QEMU exited during start-up") from error
            raise self._error(QmpError, f"QMP handshake failed: {error!r}") from error
        self._in_loop(self._log_events(self._qmp_client), timeout=5.0)

    async def _log_events(self, client: QMPClient) -> None:
        """Start a task that copies QMP events into qmp.log."""
        async def copy_events() -> None:
            async for event in client.events:
                self._log_qmp("event", dict(event))
        self._event_task = asyncio.get_running_loop().create_task(copy_events())

    def _in_loop(self, coroutine: Any, timeout: float) -> Any:
        assert self._loop is not None
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def _log_qmp(self, direction: str, message: Mapping[str, Any]) -> None:
        line = json.dumps({"t": round(time.monotonic() - self._started_at, 3),
                           "dir": direction, "msg": message}, default=str)
        with self._qmp_log_lock, self.qmp_log.open("a") as log:
            log.write(line + "\n")

    def _make_ssh_key(self) -> paramiko.Ed25519Key:
        if self.config.ssh_key_from is not None:  # the guest a migration brings here
            pem = self.config.ssh_key_from.read_text()
        else:
            pem = Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption()).decode()
        self.key_path.touch(mode=0o600)
        self.key_path.write_text(pem)
        return paramiko.Ed25519Key.from_private_key(io.StringIO(pem))

    def _connect_ssh(self, deadline: float) -> None:
        assert self.ssh_port is not None
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            self._check_alive()
            client = paramiko.SSHClient()
            # Host keys are made at each boot and the port is ours on 127.0.0.1.
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
            try:
                client.connect("127.0.0.1", port=self.ssh_port, username="root",
                               pkey=self._ssh_key, timeout=10.0, banner_timeout=20.0,
                               auth_timeout=20.0, allow_agent=False, look_for_keys=False)
            except (paramiko.SSHException, OSError, EOFError) as error:
                client.close()
                last_error = error
                time.sleep(0.5)
                continue
            self._ssh = client
            return
        raise self._error(BootTimeoutError, f"no SSH login on port {self.ssh_port} "
                          f"before the boot timeout (last error: {last_error!r})")

    def _transport(self) -> paramiko.Transport:
        if self._ssh is None:
            raise SshError(f"guest {self.config.name}: not connected (call wait_ready())")
        transport = self._ssh.get_transport()
        if transport is None or not transport.is_active():
            self._check_alive()
            raise SshError(f"guest {self.config.name}: the SSH connection dropped")
        return transport

    def _sftp(self) -> paramiko.SFTPClient:
        try:
            sftp = paramiko.SFTPClient.from_transport(self._transport())
        except paramiko.SSHException as error:
            raise SshError(f"SFTP to {self.config.name}: {error}") from error
        if sftp is None:
            raise SshError(f"guest {self.config.name}: SFTP channel refused")
        return sftp

    def _request_poweroff(self) -> None:
        try:
            self.ssh("poweroff", timeout=10.0, check=False)
        except (SshError, QemuError):
            pass  # the guest may drop the connection as it goes down

    def _wait_exit(self, timeout: float) -> None:
        if self._process is None:
            return
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            return
        self.exit_code = self._process.returncode

    def _check_alive(self) -> None:
        """Raise at once on a guest panic or a QEMU exit (reads only new console output)."""
        try:
            with self.console_log.open("rb") as console:
                console.seek(self._console_offset)
                new = console.read()
        except FileNotFoundError:
            new = b""
        window = self._console_tail + new
        self._console_offset += len(new)
        self._console_tail = window[-PANIC_WINDOW_BYTES:]
        if any(pattern in window for pattern in PANIC_PATTERNS):
            lines = self.console_text().splitlines()
            first = next((line for line in lines
                         if any(p.decode() in line for p in PANIC_PATTERNS)), "")
            raise self._error(GuestPanicError, f"the guest kernel panicked: {first.strip()}")
        if self._process is not None and self._process.poll() is not None:
            self.exit_code = self._process.returncode
            raise self._error(QemuExitedError, f"QEMU exited with code {self.exit_code}")

    def _error(self, kind: type[LauncherError], message: str) -> LauncherError:
        exit_code = self._process.poll() if self._process is not None else None
        return kind(
            f"guest {self.config.name}: {message}\n"
            f"QEMU exit code: {exit_code if exit_code is not None else 'still running'}\n"
            f"command: {shlex.join(self.command)}\n"
            f"run directory: {self.run_dir}\n"
            f"--- qemu-stderr.log (tail) ---\n{tail(self.stderr_log)}\n"
            f"--- console.log (tail) ---\n{tail(self.console_log)}"
        )

    def _cleanup(self) -> None:
        if self._ssh is not None:
            self._ssh.close()
            self._ssh = None
        if self._event_task is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._event_task.cancel)
            self._event_task = None
        if self._qmp_client is not None and self._loop is not None:
            try:
                self._in_loop(self._qmp_client.disconnect(), timeout=5.0)
            except (QMPError, OSError, EOFError, TimeoutError):
                pass
            self._qmp_client = None
        if self._loop is not None and self._loop_thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(5.0)
            self._loop.close()
            self._loop = None
            self._loop_thread = None
        if self._monitor_socket is not None:
            self._monitor_socket.close()
            self._monitor_socket = None
        _LIVE_GUESTS.discard(self)
