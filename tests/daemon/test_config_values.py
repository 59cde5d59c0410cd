"""Every bad configuration value, from the TOML file or the command line, is one
line on stderr (`tmemd: ...`, naming the setting) and exit 2, never a traceback;
good values parse to the DaemonConfig they say. Also the control socket's and
tmemctl's answers to bad values."""

from __future__ import annotations

import grp
import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tmem_host.daemon.main as tmemd_main
from tmem_host.daemon.config import DaemonConfig, GuestConfig
from tmem_host.daemon.control import ControlError
from tmem_host.daemon.process import TmemdProcess

HUGE = "9" * 400
NO_GROUP = "no-such-group-tmem"

# (id, TOML text, command-line arguments, what the one line must contain). The
# file also gets `budget = "64M"` unless it sets a budget, the command line a
# --run-dir unless the file sets run_dir.
BAD: list[tuple[str, str, list[str], str]] = [
    # Found by the tester.
    ("cli-budget-400-digits", "", ["--budget", HUGE], "--budget: not a size"),
    ("cli-nbd-size-0", "", ["--nbd-size", "0"], "--nbd-size must be from 4K to 1T bytes"),
    ("cli-nbd-size-1000", "", ["--nbd-size", "1000"], "in multiples of 4096"),
    ("toml-budget-float", "budget = 1.5", [], "budget: not a size: 1.5"),
    ("toml-log-level-int", "log_level = 5", [], "log_level must be one of"),
    ("toml-guest-list-of-ints", "guest = [1, 2]", [], "each guest must be a table"),
    ("toml-state-dir-int", "state_dir = 7", [], "state_dir must be a path"),
    ("toml-compress-string", 'compress = "false"', [], "compress must be true or false"),
    ("toml-journal-string", 'journal = "no"', [], "journal must be true or false"),
    ("toml-cap-true", '[[guest]]\nname = "g1"\ncap = true', [], "guest 'g1' cap: not a size"),
    ("toml-vsock-port-string", 'vsock_port = "abc"', [], "vsock_port must be an integer"),
    ("cli-guest-twice", "", ["--guest", "g1", "--guest", "g1"],
     "guest g1 given twice on the command line"),
    # Sizes.
    ("cli-budget-below-a-page", "", ["--budget", "100"], "--budget must be from 4K to 1P"),
    ("cli-budget-above-1P", "", ["--budget", "2P"], "--budget must be from 4K to 1P"),
    ("cli-budget-fraction-of-a-byte", "", ["--budget", "1.5"], "--budget: not a size"),
    ("cli-budget-negative", "", ["--budget", "-1"], "--budget: not a size"),
    ("toml-budget-400-digit-int", f"budget = {HUGE}", [], "budget must be from 4K to 1P"),
    ("toml-budget-400-digit-string", f'budget = "{HUGE}"', [], "budget: not a size"),
    ("cli-nbd-size-2T", "", ["--nbd-size", "2T"], "--nbd-size must be from 4K to 1T"),
    ("toml-nbd-size-float", "nbd_size = 4096.0", [], "nbd_size: not a size"),
    ("toml-nbd-size-unaligned", 'nbd_size = "1000"', [], "in multiples of 4096"),
    # Integers, strings, lists, tables.
    ("cli-vsock-port-abc", "", ["--vsock-port", "abc"], "argument --vsock-port"),
    ("cli-vsock-port-0", "", ["--vsock-port", "0"], "--vsock-port must be an integer from 1"),
    ("cli-vsock-port-any", "", ["--vsock-port", "4294967295"], "--vsock-port must be"),
    ("toml-vsock-port-bool", "vsock_port = true", [], "vsock_port must be an integer"),
    ("cli-log-level", "", ["--log-level", "loud"], "argument --log-level"),
    ("toml-log-format", 'log_format = "xml"', [], "log_format must be one of text, json"),
    ("toml-run-dir-empty", 'run_dir = ""', [], "run_dir must be a path"),
    ("toml-unknown-key", "colour = 1", [], "unknown config keys: ['colour']"),
    ("toml-not-toml", "budget = ", [], "cannot read config"),
    ("toml-nested-too-deep", "x = " + "[" * 5000, [], "cannot read config"),
    ("toml-guest-table-not-list", 'guest = {name = "g1"}', [], "guest must be a list of tables"),
    ("toml-guest-twice", '[[guest]]\nname = "g1"\n[[guest]]\nname = "g1"', [],
     "guest g1 given twice in the config"),
    ("toml-guest-weight-float", '[[guest]]\nname = "g1"\nweight = 1.5', [],
     "guest 'g1' weight must be an integer"),
    ("toml-guest-dedup-string", '[[guest]]\nname = "g1"\ndedup = "yes"', [],
     "guest 'g1' dedup must be true or false"),
    ("toml-guest-name-int", "[[guest]]\nname = 1", [], "a guest's 'name' must be a string"),
    ("cli-guest-weight-huge", "", ["--guest", f"g1:weight={HUGE}"], "guest 'g1' weight must be"),
    ("cli-guest-cap-true", "", ["--guest", "g1:cap=true"], "guest 'g1' cap: not a size"),
    ("cli-guest-cid-abc", "", ["--guest", "g1", "--guest-cid", "g1=abc"],
     "--guest-cid g1 must be an integer"),
    ("cli-guest-cid-twice", "", ["--guest", "g1", "--guest-cid", "g1=4", "--guest-cid", "g1=5"],
     "--guest-cid given twice for guest g1"),
    # The new settings.
    ("cli-durability-bad", "", ["--durability", "paranoid"], "argument --durability"),
    ("toml-durability-bad", 'durability = "paranoid"', [],
     "durability must be one of none, journal, fsync"),
    ("cli-no-journal-and-fsync", "", ["--no-journal", "--durability", "fsync"],
     "--no-journal contradicts --durability fsync"),
    ("toml-journal-false-and-journal", 'journal = false\ndurability = "journal"', [],
     "journal = false contradicts durability journal"),
    ("toml-preallocate-string", 'preallocate = "yes"', [], "preallocate must be true or false"),
    ("toml-journal-reserve-negative", "journal_reserve = -1", [],
     "journal_reserve must be from 0 to 1T bytes"),
    ("cli-journal-reserve-2T", "", ["--journal-reserve", "2T"], "--journal-reserve must be"),
    ("toml-connections-0", "connections_per_guest = 0", [],
     "connections_per_guest must be an integer from 1 to 1024"),
    ("cli-connections-1025", "", ["--connections-per-guest", "1025"],
     "--connections-per-guest must be an integer from 1 to 1024"),
    ("toml-connections-float", "connections_per_guest = 8.0", [], "connections_per_guest must be"),
    ("toml-handshake-timeout-0", "handshake_timeout = 0", [],
     "handshake_timeout must be a number of seconds above 0 and at most 3600"),
    ("toml-handshake-timeout-bool", "handshake_timeout = true", [], "handshake_timeout must be"),
    ("cli-handshake-timeout-nan", "", ["--handshake-timeout", "nan"], "--handshake-timeout must be"),
    ("cli-idle-timeout-inf", "", ["--idle-timeout", "inf"], "--idle-timeout must be"),
    ("toml-idle-timeout-string", 'idle_timeout = "300"', [], "idle_timeout must be"),
    ("toml-idle-timeout-too-long", "idle_timeout = 86401", [], "at most 86400"),
    ("toml-socket-group-unknown", f'socket_group = "{NO_GROUP}"', [],
     f"socket_group: no group '{NO_GROUP}' on this host"),
    ("cli-socket-group-unknown-gid", "", ["--socket-group", "4294967294999"],
     "--socket-group: no group"),
    ("toml-socket-group-int", "socket_group = 0", [], "socket_group must be a group name"),
    # The remote tier.
    ("cli-remote-no-port", "", ["--remote", "127.0.0.1"], "--remote must be host:port"),
    ("cli-remote-port-0", "", ["--remote", "127.0.0.1:0"], "--remote must be host:port"),
    ("toml-remote-list", 'remote = ["127.0.0.1:7000"]', [], "remote must be host:port"),
    ("cli-remote-replicas-17", "", ["--remote-replicas", "17"], "--remote-replicas must be"),
    ("cli-remote-wait-0", "", ["--remote-wait", "0"], "--remote-wait must be"),
    ("cli-remote-read-ahead-negative", "", ["--remote-read-ahead", "-1"], "--remote-read-ahead must be"),
    ("toml-remote-read-ahead-65", "remote_read_ahead = 65", [], "remote_read_ahead must be"),
    ("toml-remote-budget-float", 'budget = "64M"\nremote_budget = 1.5', [], "remote_budget: not a size"),
    ("cli-guest-uuid-bad", "", ["--guest", "g1:uuid=nope"], "guest 'g1' uuid must be a UUID"),
    ("toml-guest-remote-cap-bool", '[[guest]]\nname = "g1"\nremote_cap = true', [],
     "guest 'g1' remote_cap: not a size"),
    ("cli-host-id-slash", "", ["--host-id", "a/b"], "--host-id must be a name"),
    ("cli-encoder-threads-negative", "", ["--encoder-threads", "-1"], "--encoder-threads must be"),
    ("toml-encoder-threads-9", "encoder_threads = 9", [], "encoder_threads must be"),
    ("cli-remote-ephemeral-without-remote", "", ["--guest", "g1:remote-ephemeral"],
     "guest(s) ['g1'] have remote-ephemeral but there is no remote tier"),
    ("toml-remote-ephemeral-string", '[[guest]]\nname = "g1"\nremote_ephemeral = "yes"', [],
     "guest 'g1' remote_ephemeral must be true or false"),
    # The cached disk.
    ("cli-cached-disk-pool-without-disk", "", ["--guest", f"g1:cached-disk-pool={uuid.UUID(int=1)}"],
     "guest 'g1': cached-disk-pool needs a cached-disk"),
    ("toml-cached-disk-pool-bad", '[[guest]]\nname = "g1"\ncached_disk = "/x.img"\ncached_disk_pool = "no"', [],
     "guest 'g1' cached_disk_pool must be a UUID"),
    ("toml-cached-disk-empty", '[[guest]]\nname = "g1"\ncached_disk = ""', [],
     "guest 'g1' cached_disk must be a path"),
]
# The real entry point, in a subprocess, for a few of them.
SUBPROCESS = ("cli-budget-400-digits", "cli-nbd-size-0", "toml-budget-float", "cli-guest-twice",
              "toml-vsock-port-string", "cli-no-journal-and-fsync", "cli-durability-bad")


def _argv(tmp_path: Path, toml: str, args: list[str]) -> list[str]:
    config = tmp_path / "tmemd.toml"
    config.write_text(toml if "budget =" in toml else f'budget = "64M"\n{toml}')
    # A run_dir in the file is the value under test: --run-dir would win over it.
    run_dir = [] if "run_dir =" in toml else ["--run-dir", str(tmp_path / "run")]
    return [*run_dir, "--config", str(config), *args]


def _assert_one_line(stderr: str, message: str) -> None:
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("tmemd: ") and message in lines[0], lines[0]


class Started(Exception):
    """tmemd got past its configuration (the stub Daemon raises it)."""

    def __init__(self, config: DaemonConfig) -> None:
        super().__init__("configuration accepted")
        self.config = config


class _StubDaemon:
    def __init__(self, config: DaemonConfig) -> None:
        raise Started(config)


@pytest.fixture
def run_main(monkeypatch: pytest.MonkeyPatch,
             capsys: pytest.CaptureFixture[str]) -> Iterator[Any]:
    """main(argv) in this process up to the daemon's start: (exit code, stderr), or
    the DaemonConfig it would have started with."""
    monkeypatch.setattr(tmemd_main, "Daemon", _StubDaemon)
    monkeypatch.setattr(tmemd_main, "configure_logging", lambda level, fmt: None)

    def run(argv: list[str]) -> tuple[int | str | None, str] | DaemonConfig:
        try:
            code: int | str | None = tmemd_main.main(argv)
        except SystemExit as exit_:  # argparse's errors
            code = exit_.code
        except Started as started:
            return started.config
        return code, capsys.readouterr().err

    yield run


@pytest.mark.parametrize(("toml", "args", "message"), [case[1:] for case in BAD],
                         ids=[case[0] for case in BAD])
def test_bad_value_is_one_line_and_exit_2(run_main: Any, tmp_path: Path, toml: str,
                                          args: list[str], message: str) -> None:
    result = run_main(_argv(tmp_path, toml, args))
    assert not isinstance(result, DaemonConfig), "a bad value was accepted"
    code, stderr = result
    assert code == 2
    _assert_one_line(stderr, message)


@pytest.mark.parametrize(("toml", "args", "message"),
                         [case[1:] for case in BAD if case[0] in SUBPROCESS], ids=SUBPROCESS)
def test_bad_value_through_the_real_entry_point(tmp_path: Path, toml: str, args: list[str],
                                                message: str) -> None:
    result = subprocess.run([sys.executable, "-m", "tmem_host.daemon.main",
                             *_argv(tmp_path, toml, args)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    _assert_one_line(result.stderr, message)


def test_subprocess_cases_exist() -> None:
    assert set(SUBPROCESS) <= {case[0] for case in BAD}


MY_GROUP = grp.getgrgid(os.getgid()).gr_name

GOOD: list[tuple[str, str, list[str], dict[str, Any]]] = [
    ("defaults", "", [], {"compress": True, "durability": "journal", "journal": True,
                          "preallocate": True, "journal_reserve_bytes": 64 << 20,
                          "socket_group": None, "connections_per_guest": 8,
                          "handshake_timeout_s": 10.0, "idle_timeout_s": 300.0,
                          "nbd_size_bytes": 1 << 30, "vsock_port": None}),
    ("compress-false", "compress = false", [], {"compress": False}),
    ("no-compress", "", ["--no-compress"], {"compress": False}),
    ("durability-fsync", "", ["--durability", "fsync"], {"durability": "fsync", "journal": True}),
    ("journal-false", "journal = false", [], {"durability": "none", "journal": False}),
    ("no-journal", "", ["--no-journal"], {"durability": "none"}),
    ("journal-true-defers", 'journal = true\ndurability = "none"', [], {"durability": "none"}),
    ("command-line-wins", "journal = false", ["--durability", "journal"],
     {"durability": "journal"}),
    ("sizes-as-strings", 'budget = "1.5G"\nnbd_size = "8K"\njournal_reserve = 0', [],
     {"budget_bytes": 3 << 29, "nbd_size_bytes": 8192, "journal_reserve_bytes": 0}),
    ("new-settings-from-file",
     f'preallocate = false\nconnections_per_guest = 16\nhandshake_timeout = 2\n'
     f'idle_timeout = 0.5\nsocket_group = "{MY_GROUP}"\nvsock_port = 4000',
     [], {"preallocate": False, "connections_per_guest": 16, "handshake_timeout_s": 2.0,
          "idle_timeout_s": 0.5, "socket_group": MY_GROUP, "vsock_port": 4000}),
    ("new-settings-from-command-line", "connections_per_guest = 16",
     ["--no-preallocate", "--journal-reserve", "1M", "--connections-per-guest", "2",
      "--handshake-timeout", "1.5", "--idle-timeout", "60", "--socket-group", str(os.getgid())],
     {"preallocate": False, "journal_reserve_bytes": 1 << 20, "connections_per_guest": 2,
      "handshake_timeout_s": 1.5, "idle_timeout_s": 60.0, "socket_group": str(os.getgid())}),
    ("encoder-threads", "encoder_threads = 2", ["--encoder-threads", "0"], {"encoder_threads": 0}),
    ("remote-settings",
     'budget = "64M"\nremote = "10.0.0.5:7000,10.0.0.6:7001"\nremote_budget = "8G"\nhost_id = "hostA"',
     ["--remote-replicas", "1", "--remote-wait", "3", "--remote-read-ahead", "0"],
     {"remote_seeds": (("10.0.0.5", 7000), ("10.0.0.6", 7001)), "remote_replicas": 1,
      "remote_wait_s": 3.0, "remote_budget_bytes": 8 << 30, "host_id": "hostA",
      "remote_read_ahead": 0}),
    ("guest-identity-and-remote-cap", "",
     ["--guest", "g1:uuid=6d1b5a3e-8f0c-4b7e-9a51-2f4c0e7d9b11:remote-cap=1G"],
     {"guests": (GuestConfig("g1", guest_uuid=uuid.UUID("6d1b5a3e-8f0c-4b7e-9a51-2f4c0e7d9b11"),
                             remote_cap_bytes=1 << 30),)}),
    ("guest-remote-ephemeral", 'remote = "127.0.0.1:7000"\n[[guest]]\nname = "g2"\nremote_ephemeral = true',
     ["--guest", "g1:remote-ephemeral"],
     {"guests": (GuestConfig("g2", remote_ephemeral=True), GuestConfig("g1", remote_ephemeral=True))}),
    ("guest-cached-disk-and-its-pool",
     f'[[guest]]\nname = "g2"\ncached_disk = "/images/base.img"\ncached_disk_pool = "{uuid.UUID(int=2)}"',
     ["--guest", f"g1:cached-disk-pool={uuid.UUID(int=2)}:cached-disk=/images/base.img"],
     {"guests": (GuestConfig("g2", cached_disk=Path("/images/base.img"), cached_disk_pool=uuid.UUID(int=2)),
                 GuestConfig("g1", cached_disk=Path("/images/base.img"), cached_disk_pool=uuid.UUID(int=2)))}),
    ("command-line-guest-replaces-file-guest", '[[guest]]\nname = "g1"\nweight = 5',
     ["--guest", "g1:weight=7"], {"guests": (GuestConfig("g1", weight=7),)}),
]


@pytest.mark.parametrize(("toml", "args", "expected"), [case[1:] for case in GOOD],
                         ids=[case[0] for case in GOOD])
def test_good_values_parse(run_main: Any, tmp_path: Path, toml: str, args: list[str],
                           expected: dict[str, Any]) -> None:
    config = run_main(_argv(tmp_path, toml, args))
    assert isinstance(config, DaemonConfig), config
    assert {key: getattr(config, key) for key in expected} == expected


# -- the control socket and tmemctl ---------------------------------------------------


def _raw_reply(daemon: TmemdProcess, line: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(str(daemon.run_dir / "control.sock"))
        raw.sendall(line)
        reply: dict[str, Any] = json.loads(raw.makefile("rb").readline())
        assert raw.recv(1) == b""  # then tmemd hangs up
    return reply


@pytest.mark.parametrize(("line", "message"), [
    (b"[" * 100_000 + b"\n", "line longer than"),
    (b"[" * 60_000 + b"\n", "nested too deeply"),  # under the length limit
    (b'{"cmd": "stats", "x": ' + b"9" * 5000 + b"}\n", "not JSON"),  # int() refuses it
])
def test_control_answers_unparseable_lines_with_an_error(tmemd: TmemdProcess, line: bytes,
                                                         message: str) -> None:
    reply = _raw_reply(tmemd, line)
    assert reply["ok"] is False and message in reply["error"]
    with tmemd.control() as control:
        assert control.request("stats")["daemon"]["pid"] == tmemd.pid


def test_control_refuses_oversized_budgets(tmemd: TmemdProcess) -> None:
    with tmemd.control() as control:
        for size in (10**400, "9999999999999P", "2P", -1, "1.5"):
            with pytest.raises(ControlError, match="size"):
                control.request("set-budget", size=size)
        # The connection and the budget survive.
        assert control.request("stats")["store"]["budget_bytes"] == 64 << 20


@pytest.mark.parametrize("args", [["top", "--interval", "-1"], ["top", "--interval", "nan"],
                                  ["drain", "g1", "--timeout", "0"]])
def test_tmemctl_bad_argument_is_one_line_and_exit_2(tmp_path: Path, args: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "tmem_host.ctl.main", "--run-dir",
                             str(tmp_path), *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tmemctl") and "must be" in lines[0], lines
