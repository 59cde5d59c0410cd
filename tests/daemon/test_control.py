"""The control socket and tmemctl, with every effect checked through the ABI."""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import time
import types
import typing
from collections.abc import Sequence
from pathlib import Path

import pytest

from tmem_host.daemon.client import AbiClient, TmemdClosedConnection
from tmem_host.daemon.control import ControlClient, ControlError, DaemonNotRunning
from tmem_host.daemon.process import StartTmemd, TmemdProcess
from tmem_host.replies import (
    BudgetReply, CapReply, DrainReply, FlushReply, ForgetReply, FreezeReply, GuestRecord,
    RemoveGuestReply, StatsReply, ThawReply, WeightReply,
)
from tmem_host.nbd.client import NbdClient
from tmem_host.store import EPHEMERAL_PAGE_OVERHEAD_BYTES
from tmem_wire.abi import Feature, Flag, Hello, Op, PoolFlag, Status

RANDOM_PAGES = [random.Random(number).randbytes(4096) for number in range(64)]


def tmemctl(daemon_or_dir: TmemdProcess | Path, *args: str) -> subprocess.CompletedProcess[str]:
    run_dir = daemon_or_dir.run_dir if isinstance(daemon_or_dir, TmemdProcess) else daemon_or_dir
    return subprocess.run([sys.executable, "-m", "tmem_host.ctl.main", "--run-dir", str(run_dir),
                           *args], capture_output=True, text=True, timeout=60)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_guests_and_stats_describe_the_daemon(tmemd: TmemdProcess) -> None:
    with AbiClient.open(tmemd.abi_socket("g1")) as client:
        pool_id, _ = client.new_pool(PoolFlag.PERSISTENT)
        client.put(pool_id, (1, 0, 0), 0, RANDOM_PAGES[0])
        with tmemd.control() as control:
            guests = {guest["name"]: guest for guest in control.request("guests")}
            stats = control.request("stats")
    assert set(guests) == {"g1", "g2"}
    assert guests["g1"]["connections"] == 1
    assert guests["g1"]["pools"][0]["flags"] == ["PERSISTENT"]
    assert guests["g1"]["pools"][0]["pages"] == 1
    assert stats["store"]["clients"]["g1"]["pages"] == 1
    assert stats["store"]["budget_bytes"] == 64 << 20
    assert [c["guest"] for c in stats["connections"]] == ["g1"]
    assert stats["connections"][0]["frames_in"] == stats["connections"][0]["frames_out"] == 3
    assert set(stats["nbd"]) == {"g1", "g2"}
    assert stats["daemon"]["pid"] == tmemd.pid


def assert_shape(value: object, shape: object, where: str = "reply") -> None:
    """`value` (decoded JSON) has the type `shape`: a TypedDict with every required
    key and no key it does not declare, a list or a dict of such, a union with
    None, int, float, str or bool."""
    origin = typing.get_origin(shape)
    if typing.is_typeddict(shape):
        assert isinstance(value, dict), f"{where}: {value!r}"
        declared = typing.get_type_hints(shape)
        required: frozenset[str] = shape.__required_keys__  # type: ignore[attr-defined]
        assert not required - value.keys(), f"{where}: missing {sorted(required - value.keys())}"
        assert not value.keys() - declared.keys(), f"{where}: undeclared {sorted(value.keys() - declared.keys())}"
        for key, item in value.items():
            assert_shape(item, declared[key], f"{where}.{key}")
    elif origin in (list, Sequence):
        assert isinstance(value, list), f"{where}: {value!r}"
        (item_shape,) = typing.get_args(shape)
        for number, item in enumerate(value):
            assert_shape(item, item_shape, f"{where}[{number}]")
    elif origin is dict:
        assert isinstance(value, dict), f"{where}: {value!r}"
        _, item_shape = typing.get_args(shape)
        for key, item in value.items():
            assert_shape(item, item_shape, f"{where}.{key}")
    elif origin in (types.UnionType, typing.Union):
        options = typing.get_args(shape)
        if value is None:
            assert type(None) in options, f"{where}: None"
        else:
            (option,) = [option for option in options if option is not type(None)]
            assert_shape(value, option, where)
    elif shape is float:
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: {value!r}"
    elif shape is int:
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {value!r}"
    elif shape in (str, bool):
        assert isinstance(value, shape), f"{where}: {value!r}"
    else:
        raise AssertionError(f"{where}: no check for {shape!r}")


def test_replies_have_the_shapes_of_their_types(tmemd: TmemdProcess) -> None:
    """tmem_host.replies declares every key tmemd sends, and tmemd sends
    every key it declares required (parts built by name escape mypy)."""
    with AbiClient.open(tmemd.abi_socket("g1")) as client, \
            NbdClient(tmemd.nbd_socket("g2"), "g2") as export:
        pool_id, _ = client.new_pool(PoolFlag.PERSISTENT)
        client.put(pool_id, (1, 0, 0), 0, RANDOM_PAGES[0])
        assert export.write(0, RANDOM_PAGES[1]) == 0
        with tmemd.control() as control:
            stats = control.stats()
            assert_shape(stats, StatsReply)
            assert stats["connections"] and stats["journal"] and stats["nbd"]["g2"]["pool_id"] is not None
            assert stats["store"]["clients"]["g1"]["pools"]
            assert_shape(control.guests(), list[GuestRecord])
            assert_shape(control.set_budget("64M"), BudgetReply)
            assert_shape(control.request("set-weight", guest="g2", weight=200), WeightReply)
            assert_shape(control.request("set-cap", guest="g2", cap=None), CapReply)
            assert_shape(control.request("freeze", guest="g2"), FreezeReply)
            assert_shape(control.drain("g2"), DrainReply)
            assert_shape(control.request("thaw", guest="g2"), ThawReply)
            assert_shape(control.request("flush", guest="g1", pool=pool_id), FlushReply)
            assert_shape(control.request("add-guest", name="g3"), GuestRecord)
            assert_shape(control.request("remove-guest", guest="g3"), RemoveGuestReply)
            assert_shape(control.request("forget", guest="g3"), ForgetReply)


def test_control_errors_are_one_line_replies(tmemd: TmemdProcess) -> None:
    with tmemd.control() as control:
        with pytest.raises(ControlError, match="unknown command 'nope'"):
            control.request("nope")
        with pytest.raises(ControlError, match="no guest 'g9'"):
            control.request("freeze", guest="g9")
        with pytest.raises(ControlError, match="weight must be an integer"):
            control.request("set-weight", guest="g1", weight="heavy")
        assert control.request("guests")  # the connection survives failed commands
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(str(tmemd.run_dir / "control.sock"))
        raw.sendall(b"this is not json\n")
        reply = json.loads(raw.makefile().readline())
        assert reply["ok"] is False and "not JSON" in reply["error"]
        assert raw.recv(1) == b""  # then tmemd hangs up


def test_tmemctl_stats_json_list_and_top(tmemd: TmemdProcess) -> None:
    with AbiClient.open(tmemd.abi_socket("g2")) as client:
        pool_id, _ = client.new_pool(PoolFlag(0))
        text_page = (b"compressible text " * 300)[:4096]
        client.put_batch(pool_id, [((1, 0, 0), i) for i in range(32)], [text_page] * 32)
        stats = json.loads(ok(tmemctl(tmemd, "stats", "--json")))
        assert stats["store"]["clients"]["g2"]["pages"] == 32
        table = ok(tmemctl(tmemd, "stats"))
        assert "g2" in table and "32" in table
        listing = ok(tmemctl(tmemd, "list"))
        assert "ephemeral" in listing and "4.0 KiB" in listing
        top = ok(tmemctl(tmemd, "top", "--once", "--interval", "0.2"))
    g2_row = next(line for line in top.splitlines() if " g2 " in line)
    assert "32" in g2_row and "128.0 KiB" in g2_row  # pages and raw bytes
    ratio = float(g2_row.split("│")[5].strip().rstrip("x"))
    # Repeated text: a 44-byte lz4 block and a 1/32 share of its object's charge
    # (under 128 bytes) per page, plus the page's metadata: the stored figure
    # counts what the host holds.
    assert ratio > 4096 / (EPHEMERAL_PAGE_OVERHEAD_BYTES + 128)


def test_tmemctl_freeze_and_thaw(tmemd: TmemdProcess) -> None:
    with AbiClient.open(tmemd.abi_socket("g1")) as client:
        pool_id, _ = client.new_pool(PoolFlag.PERSISTENT)
        client.put(pool_id, (1, 0, 0), 0, RANDOM_PAGES[0])
        assert "g1: frozen" in ok(tmemctl(tmemd, "freeze", "g1"))
        assert client.put(pool_id, (1, 0, 0), 1, RANDOM_PAGES[1]) == Status.FROZEN
        assert client.get(pool_id, (1, 0, 0), 0) == (Status.OK, RANDOM_PAGES[0])
        ok(tmemctl(tmemd, "thaw", "g1"))
        assert client.put(pool_id, (1, 0, 0), 1, RANDOM_PAGES[1]) == Status.OK


def test_tmemctl_set_cap_and_weight(tmemd: TmemdProcess) -> None:
    with AbiClient.open(tmemd.abi_socket("g1")) as client:
        pool_id, _ = client.new_pool(PoolFlag.PERSISTENT)
        ok(tmemctl(tmemd, "set", "g1", "weight=250", "cap=64K"))
        statuses = client.put_batch(pool_id, [((1, 0, 0), i) for i in range(32)], RANDOM_PAGES[:32])
        accepted = statuses.count(Status.OK)
        # Random pages cost 4 KiB plus per-page overhead: fewer than 16 fit in 64 KiB.
        assert 10 <= accepted < 16
        assert statuses[accepted:] == [Status.REFUSED] * (32 - accepted)
        ok(tmemctl(tmemd, "set", "g1", "cap=none"))
        assert client.put(pool_id, (2, 0, 0), 0, RANDOM_PAGES[40]) == Status.OK
    with tmemd.control() as control:
        g1 = control.request("stats")["store"]["clients"]["g1"]
    assert (g1["weight"], g1["cap_bytes"]) == (250, None)


def test_tmemctl_set_budget_limits_every_guest(tmemd: TmemdProcess) -> None:
    assert ok(tmemctl(tmemd, "set-budget", "48K")).strip() == "budget 48K"
    with AbiClient.open(tmemd.abi_socket("g2")) as client:
        pool_id, _ = client.new_pool(PoolFlag.PERSISTENT)
        statuses = client.put_batch(pool_id, [((1, 0, 0), i) for i in range(16)], RANDOM_PAGES[:16])
    assert 8 <= statuses.count(Status.OK) < 12
    with tmemd.control() as control:
        assert control.request("stats")["store"]["budget_bytes"] == 48 * 1024


def test_tmemctl_flush_guest_or_pool(tmemd: TmemdProcess) -> None:
    with AbiClient.open(tmemd.abi_socket("g1")) as client:
        first, _ = client.new_pool(PoolFlag.PERSISTENT)
        second, _ = client.new_pool(PoolFlag.PERSISTENT)
        for pool_id in (first, second):
            client.put(pool_id, (1, 0, 0), 0, RANDOM_PAGES[pool_id])
        assert f"flushed pool {second}" in ok(tmemctl(tmemd, "flush", "g1", str(second)))
        assert client.get(second, (1, 0, 0), 0) == (Status.MISS, None)
        assert client.get(first, (1, 0, 0), 0) == (Status.OK, RANDOM_PAGES[first])
        ok(tmemctl(tmemd, "flush", "g1"))
        assert client.get(first, (1, 0, 0), 0) == (Status.MISS, None)
        # Pools survive a flush.
        assert client.put(second, (1, 0, 0), 0, RANDOM_PAGES[0]) == Status.OK


def test_tmemctl_errors_are_one_line_with_nonzero_exit(tmemd: TmemdProcess,
                                                       tmp_path: Path) -> None:
    result = tmemctl(tmemd, "freeze", "ghost")
    assert result.returncode == 1
    assert result.stderr.strip() == "tmemctl: no guest 'ghost' (known: g1, g2)"
    result = tmemctl(tmemd, "set", "g1", "colour=blue")
    assert result.returncode == 2 and "unknown setting 'colour'" in result.stderr
    result = tmemctl(tmp_path, "stats")
    assert result.returncode == 1
    assert result.stderr.startswith("tmemctl: tmemd is not running")
    assert len(result.stderr.strip().splitlines()) == 1
    with pytest.raises(DaemonNotRunning):
        ControlClient(tmp_path)


def test_guests_can_be_added_and_removed_at_run_time(tmemd: TmemdProcess) -> None:
    with tmemd.control() as control:
        added = control.request("add-guest", name="g3", weight=50, cap="1M")
        assert (added["weight"], added["cap_bytes"]) == (50, 1 << 20)
        assert tmemd.nbd_socket("g3").exists()
        with AbiClient.open(tmemd.abi_socket("g3")) as client:
            pool_id, _ = client.new_pool(PoolFlag.PERSISTENT)
            assert client.put(pool_id, (1, 0, 0), 0, RANDOM_PAGES[3]) == Status.OK
            with pytest.raises(ControlError, match="exists"):
                control.request("add-guest", name="g3")
            control.request("remove-guest", guest="g3")
            with pytest.raises(TmemdClosedConnection):
                client.get(pool_id, (1, 0, 0), 0)
        assert not tmemd.abi_socket("g3").exists()
        assert not tmemd.nbd_socket("g3").exists()
        assert "g3" not in control.request("stats")["store"]["clients"]
        # Added again, it has its pages back: removing a guest keeps its data.
        control.request("add-guest", name="g3")
        with AbiClient.open(tmemd.abi_socket("g3")) as client:
            assert client.get(pool_id, (1, 0, 0), 0) == (Status.OK, RANDOM_PAGES[3])
        # Only forget discards it; added again, it starts empty.
        control.request("remove-guest", guest="g3")
        assert control.request("forget", guest="g3")["configured"] is False
        control.request("add-guest", name="g3")
        with AbiClient.open(tmemd.abi_socket("g3")) as client:
            assert client.stats() == []


def test_shutdown_command_stops_the_daemon(start_tmemd: StartTmemd) -> None:
    daemon = start_tmemd()
    with daemon.control() as control:
        assert control.request("shutdown") == {"stopping": True}
    assert daemon.proc.wait(15) == 0
    assert not (daemon.run_dir / "control.sock").exists()


def test_add_guest_errors_are_replies_not_crashes(tmemd: TmemdProcess) -> None:
    with tmemd.control() as control:
        with pytest.raises(ControlError, match="bad guest name"):
            control.request("add-guest", name="../escape")
        with pytest.raises(ControlError, match="unknown guest keys"):
            control.request("add-guest", name="g4", colour="blue")
        # A legal name whose socket path exceeds what AF_UNIX can hold.
        with pytest.raises(ControlError, match="too long"):
            control.request("add-guest", name="x" * 64)
        assert "x" * 64 not in control.request("stats")["store"]["clients"]
        assert not list(tmemd.run_dir.glob("xxxx*"))
        control.request("add-guest", name="g4")
    with AbiClient.open(tmemd.abi_socket("g4")) as client:
        assert client.stats() == []


def test_drain_refuses_puts_flags_replies_to_agents_that_asked_and_thaw_ends_it(tmemd: TmemdProcess) -> None:
    keys = [((1, 0, 0), index) for index in range(8)]
    drain_offer = Hello(features=Feature.BATCH | Feature.ASYNC | Feature.STATS | Feature.DRAIN)
    with AbiClient.open(tmemd.abi_socket("g1"), offer=drain_offer) as agent, \
            AbiClient.open(tmemd.abi_socket("g1")) as old_client:
        assert agent.negotiated is not None and Feature.DRAIN in agent.negotiated.features
        pool_id, _ = agent.new_pool(PoolFlag.PERSISTENT)
        assert agent.put_batch(pool_id, keys, RANDOM_PAGES[:8]) == [Status.OK] * 8
        assert not agent.call(Op.STATS, pool_id=pool_id).flags & Flag.DRAIN
        # Nobody takes the pages back: the drain times out with a nonzero exit and says how many.
        result = tmemctl(tmemd, "drain", "g1", "--timeout", "0.5")
        assert result.returncode == 1 and "8 of 8 persistent pages still in tmem" in result.stderr
        waiting = subprocess.Popen([sys.executable, "-m", "tmem_host.ctl.main", "--run-dir", str(tmemd.run_dir),
                                    "drain", "g1", "--timeout", "30"], stdout=subprocess.PIPE, text=True)
        reply = agent.call(Op.STATS, pool_id=pool_id)
        assert reply.flags & Flag.DRAIN and reply.is_reply
        assert not old_client.call(Op.STATS, pool_id=pool_id).flags & Flag.DRAIN  # it never asked
        assert agent.put(pool_id, (2, 0, 0), 0, RANDOM_PAGES[9]) == Status.FROZEN
        assert agent.get(pool_id, *keys[0]) == (Status.OK, RANDOM_PAGES[0])  # gets still served
        with tmemd.control() as control:
            assert control.request("guests")[0]["draining"] is True
        for _ in range(300):  # until the waiting tmemctl's drain request is in
            if tmemd.log_text().count("guest draining") == 2:
                break
            time.sleep(0.1)
        # What the agent does on the flag: take the pages back, then flush them.
        agent.flush_batch(pool_id, keys)
        output, _ = waiting.communicate(timeout=30)
        assert waiting.returncode == 0 and output.startswith("g1: drained 8 persistent pages in "), output
        ok(tmemctl(tmemd, "thaw", "g1"))
        assert not agent.call(Op.STATS, pool_id=pool_id).flags & Flag.DRAIN
        assert agent.put(pool_id, (2, 0, 0), 0, RANDOM_PAGES[9]) == Status.OK


def test_tmemctl_drain_moves_an_nbd_exports_pages_to_its_fallback_file(tmemd: TmemdProcess) -> None:
    pages = RANDOM_PAGES[:32]
    with NbdClient(tmemd.nbd_socket("g2"), "g2") as export:
        assert export.write(0, b"".join(pages)) == 0
        with tmemd.control() as control:
            assert control.request("stats")["nbd"]["g2"]["slots_in_tmem"] == 32
        assert "g2: drained 32 persistent pages" in ok(tmemctl(tmemd, "drain", "g2", "--timeout", "30"))
        assert export.write(32 * 4096, RANDOM_PAGES[40]) == 0  # refused by tmem: to the fallback file
        with tmemd.control() as control:
            assert control.request("stats")["nbd"]["g2"]["slots_in_tmem"] == 0
        assert export.read(0, 33 * 4096) == (0, b"".join(pages) + RANDOM_PAGES[40])
        ok(tmemctl(tmemd, "thaw", "g2"))
