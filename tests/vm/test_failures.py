"""Failures are caught before or at QEMU's start and explained; nothing is left running."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tmem_host.vm.image import GuestImage
from tmem_host.vm.launcher import (
    VmConfigError, GuestPanicError, Guest, VmConfig, LauncherError, MissingImageError, QemuExitedError,
    SocketNotListeningError,
)

from tmem_host.waiting import wait_until

from .conftest import processes_mentioning

pytestmark = pytest.mark.vm


def test_missing_kernel_is_reported_before_qemu_starts(image: GuestImage, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-vmlinuz"
    guest = Guest(VmConfig(name="nokernel", image=image, kernel=missing, accel="tcg",
                           run_dir=tmp_path / "run"))
    with pytest.raises(MissingImageError, match="kernel .*no-such-vmlinuz does not exist"):
        guest.start()
    assert guest.pid is None


def test_tmem_socket_must_listen_before_qemu_starts(image: GuestImage, tmp_path: Path) -> None:
    absent = tmp_path / "absent.tmem.sock"
    bound_only = tmp_path / "bound.tmem.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as not_listening:
        not_listening.bind(str(bound_only))  # bound but never listen()s
        for path in (absent, bound_only):
            guest = Guest(VmConfig(name="nochannel", image=image, accel="tcg",
                                   tmem_socket=path, run_dir=tmp_path / "run"))
            with pytest.raises(SocketNotListeningError, match=f"{path} is not listening"):
                guest.start()
            assert guest.pid is None


@pytest.mark.skipif(Path("/dev/vhost-vsock").exists(), reason="this host has vhost-vsock")
def test_vsock_is_refused_without_vhost_vsock(image: GuestImage, tmp_path: Path) -> None:
    guest = Guest(VmConfig(name="novsock", image=image, accel="tcg", vsock_cid=3,
                           run_dir=tmp_path / "run"))
    with pytest.raises(VmConfigError, match="/dev/vhost-vsock does not exist"):
        guest.start()
    assert guest.pid is None


def test_qemu_start_failure_carries_exit_code_command_and_log(
        image: GuestImage, tmp_path: Path) -> None:
    run_dir = tmp_path / "badopt"
    guest = Guest(VmConfig(name="badopt", image=image, accel="tcg", run_dir=run_dir,
                           qemu_args=["-no-such-option"]))
    with pytest.raises(QemuExitedError) as failure:
        with guest:
            pass
    message = str(failure.value)
    assert "QEMU exit code: 1" in message
    assert "command: qemu-system-x86_64 " in message and "-no-such-option" in message
    assert "invalid option" in message  # QEMU's own stderr, from the log tail
    assert isinstance(failure.value, LauncherError)
    assert guest.exit_code == 1 and processes_mentioning(str(run_dir)) == []


@pytest.mark.slow
def test_guest_kernel_panic_is_raised_at_once(image: GuestImage, tmp_path: Path) -> None:
    run_dir = tmp_path / "panic"
    # The initramfs cannot switch_root to a missing init, exits, and the kernel panics.
    config = VmConfig(name="panic", image=image, accel="tcg", run_dir=run_dir,
                      kernel_args=["tmem.init=/no/such/init"])
    with pytest.raises(GuestPanicError, match="panicked") as failure:
        with Guest(config):
            pass
    assert "Kernel panic" in str(failure.value)  # the console tail is in the message
    assert processes_mentioning(str(run_dir)) == []


# A launcher user that starts a guest and then dies (SIGKILL), is interrupted
# (SIGINT, as Ctrl-C) or just returns without shutting the guest down.
ABANDONING_PARENT = """
import sys, time
from pathlib import Path
from tmem_host.vm.launcher import Guest, VmConfig
config = VmConfig(name="orphan", accel="tcg", run_dir=Path(sys.argv[1]))
if sys.argv[2] == "interrupt":
    with Guest(config) as guest:
        print(guest.pid, flush=True)
        time.sleep(600)
guest = Guest(config)
guest.start()
print(guest.pid, flush=True)
if sys.argv[2] == "kill":
    time.sleep(600)
"""




@pytest.mark.parametrize("ending", ["kill", "interrupt", "return"])
def test_no_qemu_outlives_its_parent(image: GuestImage, tmp_path: Path, ending: str) -> None:
    run_dir = tmp_path / ending
    parent = subprocess.Popen([sys.executable, "-c", ABANDONING_PARENT, str(run_dir), ending],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # The parent prints QEMU's pid once it runs ("return" exits right after,
        # possibly before a poll here could see QEMU alive).
        assert parent.stdout is not None
        qemu_pid = parent.stdout.readline().strip()
        assert qemu_pid.isdigit(), qemu_pid + parent.communicate(timeout=30)[0]
        if ending == "kill":
            parent.kill()
        elif ending == "interrupt":
            parent.send_signal(signal.SIGINT)
        output = parent.communicate(timeout=60)[0]
        if ending == "interrupt":
            assert "KeyboardInterrupt" in output
        assert wait_until(lambda: not Path(f"/proc/{int(qemu_pid)}").exists(), 15.0)
        assert not processes_mentioning(f"{run_dir}/console.log")
    finally:
        parent.kill()
        parent.wait()
