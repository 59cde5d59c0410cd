"""The hostile-guest program (tmem_workloads.hostile) against a real tmemd over the
guest's unix socket, as QEMU's chardev connects it: malformed frames, forged
requests for another guest's pages, a put flood. A victim guest keeps storing and
verifying its pages throughout; tmemd survives, reveals nothing, holds the
attacker to its cap. (The same program in a real guest: tests/agent/test_fault_injection.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
import threading

from tmem_host.daemon.client import AbiClient
from tmem_host.daemon.process import StartTmemd
from tmem_host.store import OBJECT_OVERHEAD_BYTES, page_overhead_bytes
from tmem_wire.abi import PoolFlag, Status
from tmem_workloads.usemem import expected_page, page_templates

CAP = 8 << 20
FLOOD_MIB = 24


def test_a_hostile_guest_learns_nothing_and_harms_no_one(start_tmemd: StartTmemd) -> None:
    daemon = start_tmemd(guests=("victim", f"evil:cap={CAP}"), budget="32M")
    templates = page_templates(9)
    failures: list[str] = []
    verified_rounds = [0]
    done = threading.Event()

    def victim() -> None:
        # The frontswap keys the attacker guesses, in pool 0 as the agent's would be.
        with AbiClient.open(daemon.abi_socket("victim")) as client:
            pool_id, _ = client.new_pool(PoolFlag.PERSISTENT)
            keys = [((slot & 15, 0, 0), slot >> 4) for slot in range(256)]
            pages = [expected_page(templates, 9, slot) for slot in range(256)]
            while not done.is_set():
                statuses = client.put_batch(pool_id, keys[:128], pages[:128])
                statuses += client.put_batch(pool_id, keys[128:], pages[128:])
                if statuses != [Status.OK] * 256:
                    failures.append(f"victim puts: {set(statuses)}")
                if client.get_batch(pool_id, keys) != pages:
                    failures.append(f"victim pages came back wrong in round {verified_rounds[0]}")
                verified_rounds[0] += 1

    thread = threading.Thread(target=victim)
    thread.start()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "tmem_workloads.hostile", "--channel",
             f"unix:{daemon.abi_socket('evil')}", "--seconds", "3", "--flood-mib",
             str(FLOOD_MIB)], capture_output=True, text=True, timeout=120)
    finally:
        done.set()
        thread.join(60)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert not report["breached"] and report["bad_replies"] == []
    assert report["malformed_rounds"] > 0 and report["closed_by_tmemd"] > 0
    assert set(report["forged_statuses"]) == {"INVALID"} and report["forged_requests"] > 500
    assert report["forged_pages_seen"] == 0 and report["stats_pools_seen"] == 0
    # The flood: the persistent half refused at the cap, the ephemeral half
    # accepted by evicting the attacker's own ephemeral pages only.
    sent = FLOOD_MIB << 8
    assert report["flood_pages_sent"] == sent
    assert report["flood_pages_refused"] > 0
    with daemon.control() as control:
        stats = control.request("stats")
    evil = stats["store"]["clients"]["evil"]
    assert evil["stored_bytes"] <= CAP and evil["refusals"] == report["flood_pages_refused"]
    # Every page stored raw: charged its 4096 bytes, its metadata and its object's.
    assert evil["stored_bytes"] == sum(
        pool["pages"] * (4096 + page_overhead_bytes(pool["persistent"]))
        + pool["objects"] * OBJECT_OVERHEAD_BYTES for pool in evil["pools"] if pool["owner"])
    victim_client = stats["store"]["clients"]["victim"]
    assert victim_client["evictions"] == 0 and victim_client["refusals"] == 0
    assert failures == [] and verified_rounds[0] > 0
    assert daemon.alive() and "Traceback" not in daemon.log_text()
