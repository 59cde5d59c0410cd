"""Measure frontswap through the guest agent against plain swap disks.

    .venv/bin/python bench/agent_swap.py [--mib 384] [--cgroup-max 128M] [--runs 1]
        [--variants sync,batched,pipelined,hdd,hostcache,blk] [--page-cluster N]
        [--agent-source DIR]

Each variant boots a fresh 256 MiB TCG guest and runs the checksummed page toucher
(tmem_workloads.usemem) in a cgroup with memory.max (the guard docs/PROTOTYPE.md found robust).
Agent variants swap through the agent (fallback: an unthrottled disk); `hdd` and
`hostcache` swap straight onto a 200-IOPS or an unthrottled virtio-blk disk; `blk`
onto tmemd's NBD export through QEMU's NBD client (the testbed's tmem-blk).
`--page-cluster` sets vm.page-cluster (swap readahead: 2^N pages) in every variant
alike; `--agent-source` shares another checkout's guest/ and wire/ (a before/after
comparison in one tree). Pages/s = (pswpin + pswpout) / workload runtime; the mean
pages per swap request comes from the swap disk's /sys/block/*/stat. Prints one
JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import tempfile
import time
from pathlib import Path
from typing import Any

from tmem_host.daemon.process import TmemdProcess
from tmem_host.vm import launcher
from tmem_host.vm.launcher import Guest, VmConfig
from tmem_wire.agent import AGENT_MODES, AGENT_READY_FILE, AGENT_RUN_DIR, DISK_SERIALS

DISK_VARIANTS = ("hdd", "hostcache", "blk")
CGROUP = "/sys/fs/cgroup/workload"
# The swap device's /sys/block/DEV/stat: reads completed, sectors read, writes completed, sectors written.
SWAP_DEVICE_STAT = ("dev=/dev/nbd0; [ -e /sys/block/nbd0/pid ] || for d in /sys/block/*; do "
                    f"[ \"$(cat $d/serial 2>/dev/null)\" = {DISK_SERIALS['swap']} ] && dev=$d; done; "
                    "cat /sys/block/$(basename $dev)/stat")


def vmstat_swaps(guest: Guest) -> int:
    fields = dict(line.split() for line in guest.ssh("cat /proc/vmstat").stdout.splitlines())
    return int(fields["pswpin"]) + int(fields["pswpout"])


def pages_per_request(guest: Guest) -> tuple[float, float]:
    """Mean pages per completed read and write request on the swap device so far."""
    fields = [int(field) for field in guest.ssh(SWAP_DEVICE_STAT).stdout.split()]
    reads, read_sectors, writes, write_sectors = fields[0], fields[2], fields[4], fields[6]
    return round(read_sectors / 8 / max(reads, 1), 1), round(write_sectors / 8 / max(writes, 1), 1)


def run_variant(variant: str, mib: int, cgroup_max: str, page_cluster: int | None, work_dir: Path) -> dict[str, Any]:
    agent = variant in AGENT_MODES
    blk = variant == "blk"
    with TmemdProcess(work_dir / "tmemd", budget="1G", guests=("bench",), nbd_size="1G") as daemon:
        config = VmConfig(
            name="bench", memory_mib=256, accel="tcg",
            swap="hostcache" if agent else "nbd" if blk else variant,  # type: ignore[arg-type]
            swap_mib=1024, tmem_socket=daemon.abi_socket("bench") if agent else None, run_dir=work_dir / "guest",
            nbd_socket=daemon.nbd_socket("bench") if blk else None, nbd_export="bench" if blk else None,
        )
        with Guest(config) as guest:
            if page_cluster is not None:
                guest.ssh(f"sysctl -q vm.page-cluster={page_cluster}")
            if agent:
                guest.ssh(f"mkdir -p {AGENT_RUN_DIR} && setsid -f python3 -m tmem_guest start --swap {variant} "
                          f"> {AGENT_RUN_DIR}/agent.log 2>&1 < /dev/null")
                guest.ssh(f"for i in $(seq 120); do test -f {AGENT_READY_FILE} && exit 0; sleep 0.5; done; exit 1")
            else:
                guest.ssh(f"disk=; for d in /sys/block/*; do [ \"$(cat $d/serial 2>/dev/null)\" = {DISK_SERIALS['swap']} ] && "
                          "disk=/dev/$(basename $d); done; mkswap $disk >/dev/null && swapon -p 10 --discard $disk")
            before = vmstat_swaps(guest)
            script = (f"echo +memory > /sys/fs/cgroup/cgroup.subtree_control && mkdir -p {CGROUP} && "
                      f"echo {cgroup_max} > {CGROUP}/memory.max && echo $$ > {CGROUP}/cgroup.procs && "
                      f"exec python3 -m tmem_workloads.usemem --mib {mib}")
            started = time.monotonic()
            output = guest.ssh(f"sh -c {shlex.quote(script)}", timeout=3600).stdout
            wall = time.monotonic() - started
            swapped = vmstat_swaps(guest) - before
            read_pages, write_pages = pages_per_request(guest)
            result: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
            agent_stats = json.loads(guest.ssh("python3 -m tmem_guest stats").stdout).get("swap") if agent else None
    return {
        "variant": variant, "mib": mib, "cgroup_max": cgroup_max, "page_cluster": page_cluster,
        "verified": result["verified"], "pages_per_read": read_pages, "pages_per_write": write_pages,
        "workload_s": result["total_s"], "write_s": result["write_s"], "verify_s": result["verify_s"],
        "wall_s": round(wall, 1), "pages_swapped": swapped,
        "pages_per_s": round(swapped / result["total_s"]) if result["total_s"] else 0,
        "agent_counters": agent_stats["counters"] if agent_stats else None,
        "agent_latency_p50_us": {op: h["p50_us"] for op, h in agent_stats["latency"].items()} if agent_stats else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=384)
    parser.add_argument("--cgroup-max", default="128M")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--variants", default=",".join((*AGENT_MODES, *DISK_VARIANTS)))
    parser.add_argument("--page-cluster", type=int, help="vm.page-cluster in every variant (default: the image's)")
    parser.add_argument("--agent-source", type=Path, help="a checkout whose guest/ and wire/ the guests run")
    arguments = parser.parse_args()
    if arguments.agent_source is not None:
        launcher.AGENT_SHARES.update(tmemguest=arguments.agent_source / "guest", tmemwire=arguments.agent_source / "wire")
    for run in range(arguments.runs):
        for variant in arguments.variants.split(","):
            with tempfile.TemporaryDirectory(prefix=f"agent-bench-{variant}-") as work_dir:
                result = run_variant(variant, arguments.mib, arguments.cgroup_max, arguments.page_cluster, Path(work_dir))
            print(json.dumps({"run": run, **result}), flush=True)


if __name__ == "__main__":
    main()
