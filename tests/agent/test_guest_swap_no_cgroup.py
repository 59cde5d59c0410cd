"""The agent's deadlock bound (issue #5), in `make test`: a small TCG guest swaps
twice its RAM through the agent with no memory cgroup around the workload.

Nothing but the agent's own setup stands between the workload and the guest's
reclaim: mlockall, PR_SET_IO_FLUSHER, the allocator settings it re-executes with,
an I/O path that allocates nothing per request, order-0 port writes, and the
image's reclaim sysctls (docs/AGENT.md, "Without a cgroup"). The fastest mode
runs here; the other modes' no-cgroup runs are `make stress`
(tests/agent/test_guest_swap.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .conftest import boot_agent_guest
from .test_guest_swap import check_pages_went_through_tmemd, run_unlimited_workload
from tmem_host.daemon.process import TmemdProcess
from tmem_host.vm.launcher import Guest

pytestmark = [pytest.mark.vm, pytest.mark.slow]

# The smallest guest that passed this repeatedly (docs/AGENT.md has the count).
SMALL_GUEST_MIB = 192


@pytest.fixture(scope="module")
def small_guest(tmemd: TmemdProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    yield from boot_agent_guest(tmemd, tmp_path_factory, memory_mib=SMALL_GUEST_MIB)


@pytest.mark.timeout(900)
def test_pipelined_agent_swaps_twice_guest_ram_without_a_cgroup(small_guest: Guest, tmemd: TmemdProcess) -> None:
    result, stats = run_unlimited_workload(small_guest, "pipelined", 2.0)
    assert result["verified"]
    check_pages_went_through_tmemd(tmemd, stats, "pipelined")
