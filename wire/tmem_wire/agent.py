"""Names the host and the guest agent must agree on (stdlib only, no I/O).

The host's launcher gives the tmem channel and the disks these names and the
testbed runs and reads the agent through SSH by them (``tmem_host.vm``); the
agent finds its port and fallback disk and keeps its files by the same names
(``tmem_guest``). One definition here, imported by both sides.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

# The agent's run directory in the guest: its counters (NAME.json, docs/AGENT.md)
# and its ready file, which holds its pid once swap is on and the cache mounted.
AGENT_RUN_DIR: Final = "/run/tmem-agent"
AGENT_READY_FILE: Final = f"{AGENT_RUN_DIR}/ready"
# The agent's log, on the root disk, never under /run or /tmp: a tmpfs page swaps
# out through the agent's own device, and the next log line after that waits on
# the agent itself (a deadlock caught by SysRq-W, docs/AGENT.md "Memory").
AGENT_LOG_FILE: Final = "/var/log/tmem-agent.log"

# The virtio-serial port of the tmem channel (QEMU's virtserialport name=; the
# guest sees it in /sys/class/virtio-ports/*/name).
PORT_NAME: Final = "org.tmem.0"

# The agent's frontswap modes: one page per synchronous round trip (the 2011
# ABI), batches, and batches with several NBD requests served at once.
AgentMode = Literal["sync", "batched", "pipelined"]
AGENT_MODES: Final[tuple[AgentMode, ...]] = get_args(AgentMode)

# The virtio-blk serials of the guest's disks (/sys/block/*/serial), by role.
DISK_SERIALS: Final[dict[str, str]] = {"root": "tmem-root", "swap": "tmem-swap", "data": "tmem-data"}
