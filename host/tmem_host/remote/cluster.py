"""A real Redis Cluster on loopback, for the tests, the testbed and the bench.

`LocalCluster` starts Debian's redis-server as N masters with R replicas each
(one redis.conf per node under its scratch dir, cluster bus on port+10000),
joins them with `redis-cli --cluster create` and waits until the cluster is
healthy. It can then break the cluster the ways the remote tier must survive:
kill a master (a replica is promoted within seconds: cluster-node-timeout is
2 s), pause every node (unreachable, nothing lost), stop and restart them all
(the data survives in the AOF).

    with LocalCluster(Path("/tmp/rc")) as cluster:
        print(cluster.seed_spec)        # 127.0.0.1:p1,127.0.0.1:p2,...

Manual use: `python -m tmem_host.remote.cluster up DIR`.
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tmem_host.waiting import wait_until

HOST = "127.0.0.1"
SLOTS = 16384
# INFO persistence fields that are 1 while a node is busy with its data files.
SETTLING_FLAGS = ("loading", "async_loading", "aof_rewrite_in_progress", "aof_rewrite_scheduled")
BUS_PORT_OFFSET = 10000
# Client ports are drawn from here: their bus ports (+10000) stay below Linux's
# default ephemeral range (32768-60999), so no outgoing connection takes one
# between the check that it is free and redis-server binding it.
PORT_RANGE = (12000, 22000)
NODE_TIMEOUT_MS = 2000
START_TIMEOUT_S = 30.0
HEALTHY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
SIGTERM_REPEAT_S = 1.0
# Tries to launch a node when its port was taken after the check (a race).
PORT_ATTEMPTS = 5
ADMIN_TIMEOUT_S = 2.0


class ClusterError(Exception):
    """Root of this module's errors.

    ClusterError
    ├── ClusterLaunchError   redis-server or redis-cli failed: the message carries
    │                        the command, exit code and output
    └── ClusterTimeoutError  the cluster did not become healthy (or fail over)
                             in time: the message says what was still wrong
    """


class ClusterLaunchError(ClusterError):
    def __init__(self, what: str, command: Sequence[str], exit_code: int | None,
                 output: str) -> None:
        self.command = list(command)
        self.exit_code = exit_code
        self.output = output
        status = "still running" if exit_code is None else f"exit code {exit_code}"
        super().__init__(f"{what} ({status})\ncommand: {shlex.join(self.command)}\n"
                         f"output:\n{output}")


class ClusterTimeoutError(ClusterError):
    pass


@dataclass(frozen=True, slots=True)
class NodeView:
    """One line of CLUSTER NODES: how one node sees another."""
    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    connected: bool
    slots: tuple[tuple[int, int], ...]  # served slot ranges, first and last inclusive

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def failing(self) -> bool:
        return bool(self.flags & {"fail", "fail?", "handshake", "noaddr"})

    @property
    def slot_count(self) -> int:
        return sum(last - first + 1 for first, last in self.slots)


def parse_cluster_nodes(text: str) -> list[NodeView]:
    views = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        slots = []
        for spec in fields[8:]:
            if spec.startswith("["):  # a slot being migrated or imported, not served
                continue
            first, _, last = spec.partition("-")
            slots.append((int(first), int(last or first)))
        views.append(NodeView(
            node_id=fields[0], port=int(fields[1].split("@")[0].rpartition(":")[2]),
            flags=frozenset(fields[2].split(",")),
            master_id=None if fields[3] == "-" else fields[3],
            connected=fields[7] == "connected", slots=tuple(slots)))
    return views


@dataclass(eq=False)
class RedisNode:
    """One redis-server of the cluster: its directory, conf and current process."""
    port: int
    directory: Path
    command: list[str]  # redis-server CONF
    process: subprocess.Popen[bytes] | None = None
    node_id: str = ""
    # The ids of its replicas when it was killed as a master (for wait_failover).
    replicas_when_killed: frozenset[str] = field(default_factory=frozenset)

    @property
    def conf_path(self) -> Path:
        return self.directory / "redis.conf"

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    @property
    def output_path(self) -> Path:
        """redis-server's stdout and stderr: what it says before its logfile is open."""
        return self.directory / "output.log"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.running else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self, *, timeout: float = ADMIN_TIMEOUT_S,
               decode_responses: bool = True) -> redis.Redis:
        """A fresh admin connection (no retries: a dead node must fail fast).
        ``decode_responses=False`` for binary values (tmemd's pages)."""
        return redis.Redis(HOST, self.port, decode_responses=decode_responses,
                           socket_timeout=timeout, socket_connect_timeout=timeout,
                           retry=Retry(NoBackoff(), 0))

    def role(self) -> str | None:
        """"master" or "slave" as the node says now; None when it does not answer."""
        try:
            with self.client() as client:
                return str(client.role()[0])
        except redis.RedisError:
            return None

    def view(self) -> list[NodeView]:
        with self.client() as client:
            return parse_cluster_nodes(str(client.execute_command("CLUSTER", "NODES")))

    def send_signal(self, signum: int) -> None:
        """Signal its process group (redis-server and any fork child, e.g. an AOF
        rewrite). Only while the process is unreaped, so the group is still ours."""
        if self.running:
            assert self.process is not None
            os.killpg(self.process.pid, signum)

    def __repr__(self) -> str:
        return f"RedisNode(port={self.port}, pid={self.pid})"


T = TypeVar("T")


def _poll(what: str, probe: Callable[[], T | None], timeout: float,
          interval: float = 0.05) -> T:
    """Call ``probe`` until it returns something other than None; a
    ClusterTimeoutError after ``timeout`` seconds (the last exception, if any,
    goes into the message)."""
    result: list[T] = []
    last_error: list[str] = []

    def attempt() -> bool:
        try:
            value = probe()
        except (redis.RedisError, OSError) as error:
            last_error[:] = [f"{type(error).__name__}: {error}"]
            return False
        if value is not None:
            result.append(value)
        return bool(result)

    if not wait_until(attempt, timeout, interval):
        detail = f" (last error: {last_error[0]})" if last_error else ""
        raise ClusterTimeoutError(f"{what} not within {timeout} s{detail}")
    return result[0]


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def _quote(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


class LocalCluster:
    def __init__(self, scratch_dir: Path, *, masters: int = 3, replicas_per_master: int = 1,
                 base_port: int | None = None, maxmemory_policy: str = "noeviction",
                 appendonly: bool = True, aof_rewrite: bool = True) -> None:
        """``base_port``: the first client port to try (default: a random one in
        PORT_RANGE); busy ports, or ports whose bus port is busy, are skipped.
        ``aof_rewrite=False``: the nodes never rewrite their append-only files on
        their own (each rewrite forks and writes the node's whole data set; a
        benchmark wants none landing in one timed row and not in another)."""
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        if replicas_per_master < 0:
            raise ValueError("replicas_per_master must be >= 0")
        self.scratch_dir = Path(scratch_dir)
        self.master_count = masters
        self.replicas_per_master = replicas_per_master
        self.base_port = base_port
        self.maxmemory_policy = maxmemory_policy
        self.appendonly = appendonly
        self.aof_rewrite = aof_rewrite
        self._nodes: list[RedisNode] = []
        self._next_port = base_port if base_port is not None else random.randrange(*PORT_RANGE)

    # -- the nodes -----------------------------------------------------------------

    @property
    def nodes(self) -> list[RedisNode]:
        return list(self._nodes)

    @property
    def seeds(self) -> list[tuple[str, int]]:
        return [(HOST, node.port) for node in self._nodes]

    @property
    def seed_spec(self) -> str:
        """The form tmemd's --remote option takes: "127.0.0.1:p1,127.0.0.1:p2,..."."""
        return ",".join(f"{host}:{port}" for host, port in self.seeds)

    def masters(self) -> list[RedisNode]:
        """The running nodes that say they are masters now (failovers change it)."""
        return [node for node in self._nodes if node.running and node.role() == "master"]

    def replicas(self) -> list[RedisNode]:
        return [node for node in self._nodes if node.running and node.role() == "slave"]

    def master_of(self, key: bytes | str) -> RedisNode:
        """The node serving ``key``'s slot now, as the first running node that
        answers sees it (a test kills it to lose the key's master)."""
        for node in self._nodes:
            if not node.running:
                continue
            try:
                with node.client() as client:
                    slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
                views = node.view()
            except redis.RedisError:
                continue
            for view in views:
                if view.is_master and any(first <= slot <= last for first, last in view.slots):
                    return self.node_by_port(view.port)
            raise ClusterError(f"{node} sees no master for slot {slot}")
        raise ClusterError("no running node answers")

    def node_by_port(self, port: int) -> RedisNode:
        for node in self._nodes:
            if node.port == port:
                return node
        raise KeyError(port)

    # -- starting and stopping -----------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT_S) -> LocalCluster:
        if self._nodes:
            raise ClusterError("this LocalCluster was started already")
        server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if server is None or cli is None:
            raise ClusterError("redis-server or redis-cli is missing: install the "
                               "packages in ci/system-packages.txt")
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        try:
            count = self.master_count * (1 + self.replicas_per_master)
            for _ in range(count):
                self._launch_new_node(server)
            for node in self._nodes:
                self._wait_answers(node, timeout)
                with node.client() as client:
                    node.node_id = str(client.execute_command("CLUSTER", "MYID"))
            command = [cli, "--cluster", "create", *(f"{HOST}:{n.port}" for n in self._nodes),
                       "--cluster-replicas", str(self.replicas_per_master), "--cluster-yes"]
            try:
                result = subprocess.run(command, capture_output=True, text=True,
                                        timeout=timeout, stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired as error:
                raise ClusterLaunchError(f"redis-cli --cluster create hung for {timeout} s",
                                         command, None, str(error.stdout or "")) from None
            if result.returncode != 0:
                raise ClusterLaunchError("redis-cli --cluster create failed", command,
                                         result.returncode, result.stdout + result.stderr)
            self.wait_healthy(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def _conf_text(self, node: RedisNode) -> str:
        lines = [
            f"bind {HOST}", f"port {node.port}", "protected-mode yes", "daemonize no",
            "cluster-enabled yes", "cluster-config-file nodes.conf",
            f"cluster-node-timeout {NODE_TIMEOUT_MS}",
            f"appendonly {'yes' if self.appendonly else 'no'}", "appendfsync everysec",
            f"auto-aof-rewrite-percentage {100 if self.aof_rewrite else 0}",
            # No RDB snapshots: their fork stalls the node and the AOF is the record.
            'save ""',
            # A replica's full sync starts at once, not after the default 5 s wait
            # for more replicas to share it: restarts and rejoins take seconds.
            "repl-diskless-sync-delay 0",
            f"dir {_quote(str(node.directory))}", f"logfile {_quote(str(node.log_path))}",
            f"maxmemory-policy {self.maxmemory_policy}",
        ]
        return "\n".join(lines) + "\n"

    def _free_port(self) -> int:
        low, high = (PORT_RANGE if self.base_port is None
                     else (self.base_port, 65536 - BUS_PORT_OFFSET))
        for _ in range(high - low):
            port = self._next_port
            self._next_port = port + 1 if port + 1 < high else low
            if _port_free(port) and _port_free(port + BUS_PORT_OFFSET):
                return port
        raise ClusterError(f"no free port pair (port, port+{BUS_PORT_OFFSET}) from {low} to {high}")

    def _launch_new_node(self, server: str) -> None:
        """A new node on a free port; a port taken after the check is retried on another."""
        for _ in range(PORT_ATTEMPTS):
            port = self._free_port()
            directory = self.scratch_dir / f"node-{port}"
            # A fresh node: no nodes.conf or AOF of an earlier cluster on this port.
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True)
            node = RedisNode(port, directory, [server, str(directory / "redis.conf")])
            node.conf_path.write_text(self._conf_text(node))
            self._nodes.append(node)  # from now on close() stops it
            self._spawn(node)
            wait_until(lambda: not node.running or self._answers(node), 2.0)
            if node.running or "Address already in use" not in _tail(node.log_path):
                return  # up, still starting, or a failure _wait_answers reports
            self._reap(node)
            self._nodes.remove(node)
        raise ClusterError(f"no port stayed free for a node in {PORT_ATTEMPTS} tries")

    @staticmethod
    def _spawn(node: RedisNode) -> None:
        with node.output_path.open("ab") as output:
            # Its own session: a Ctrl-C at the terminal reaches only us, and we
            # stop the nodes in order.
            node.process = subprocess.Popen(node.command, stdin=subprocess.DEVNULL,
                                            stdout=output, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    @staticmethod
    def _answers(node: RedisNode) -> bool:
        try:
            with node.client(timeout=0.5) as client:
                return bool(client.ping())
        except redis.RedisError:  # refused, or still loading its AOF
            return False

    def _wait_answers(self, node: RedisNode, timeout: float) -> None:
        wait_until(lambda: not node.running or self._answers(node), timeout)
        if node.running and self._answers(node):
            return
        assert node.process is not None
        exit_code = node.process.poll()
        output = node.output_path.read_text(errors="replace") + _tail(node.log_path)
        if exit_code is None:
            self._reap(node)
        raise ClusterLaunchError(
            f"redis-server on port {node.port} did not answer PING within {timeout} s"
            if exit_code is None else f"redis-server on port {node.port} exited",
            node.command, exit_code, output)

    def _reap(self, node: RedisNode) -> None:
        """SIGKILL the node's process group if it still runs, and reap it."""
        node.send_signal(signal.SIGKILL)
        if node.process is not None:
            node.process.wait()

    def _stop(self, nodes: Sequence[RedisNode], timeout: float) -> list[RedisNode]:
        """SIGTERM (after SIGCONT: a stopped process cannot act on it) and wait;
        SIGKILL what is left after ``timeout``. Returns the nodes that needed SIGKILL.
        SIGTERM is repeated: redis-server refuses one while it writes its initial AOF
        (after a full sync), and does not retry by itself."""
        running = [node for node in nodes if node.running]
        deadline = time.monotonic() + timeout
        while (left := [node for node in running if node.running]) and time.monotonic() < deadline:
            for node in left:
                node.send_signal(signal.SIGCONT)
                node.send_signal(signal.SIGTERM)
            wait_until(lambda: not any(node.running for node in left),
                       min(SIGTERM_REPEAT_S, max(0.0, deadline - time.monotonic())))
        stubborn = [node for node in running if node.running]
        for node in running:
            self._reap(node)
        return stubborn

    def close(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop every node (idempotent; also after a failed start)."""
        self._stop(self._nodes, timeout)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    # -- breaking it ---------------------------------------------------------------

    def kill(self, node: RedisNode) -> None:
        """SIGKILL: a crashed node. A master's replicas are noted for wait_failover."""
        if not node.running:
            raise ClusterError(f"{node} is not running")
        try:
            views = node.view()
        except redis.RedisError:
            views = []  # paused or wedged: no failover to wait for
        node.replicas_when_killed = frozenset(view.node_id for view in views
                                              if view.master_id == node.node_id)
        self._reap(node)

    def restart(self, node: RedisNode, timeout: float = START_TIMEOUT_S) -> None:
        """Start a stopped node again from its conf: it rejoins with its nodes.conf
        (a killed master comes back as a replica of the one promoted in its place)."""
        if node.running:
            raise ClusterError(f"{node} is running")
        self._spawn(node)
        self._wait_answers(node, timeout)

    def pause(self) -> None:
        """SIGSTOP every node: the whole cluster unreachable, its data kept.
        Longer than the node timeout (2 s), the nodes may fail each other over
        once resumed; wait_healthy after resume() covers that."""
        for node in self._nodes:
            node.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        for node in self._nodes:
            node.send_signal(signal.SIGCONT)

    def stop_all(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM every node: each fsyncs its AOF and writes its nodes.conf."""
        stubborn = self._stop(self._nodes, timeout)
        if stubborn:
            raise ClusterError(f"{stubborn} ignored SIGTERM for {timeout} s and were killed")

    def start_all(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start every stopped node from its conf and AOF; wait until healthy."""
        for node in self._nodes:
            if not node.running:
                self._spawn(node)
        for node in self._nodes:
            self._wait_answers(node, timeout)
        self.wait_healthy(timeout)

    def heal(self, timeout: float = START_TIMEOUT_S) -> None:
        """Undo whatever a test did: resume, restart stopped nodes, wait healthy."""
        self.resume()
        self.start_all(timeout)

    # -- waiting -------------------------------------------------------------------

    def health_problem(self) -> str | None:
        """What keeps the cluster from being healthy now, or None. Healthy: every
        running node says cluster_state:ok, is done loading and rewriting its AOF,
        has its master link up if a replica, sees every running node as reachable,
        with the role and master that node gives itself (gossip has converged),
        and every slot served by a running, non-failing master. A killed node may
        stay down (its slots served by a promoted replica)."""
        running = {node.port for node in self._nodes if node.running}
        if not running:
            return "no node is running"
        views_by_node: dict[RedisNode, list[NodeView]] = {}
        for node in self._nodes:
            if not node.running:
                continue
            try:
                problem, views = self._node_problem(node)
            except redis.RedisError as error:  # paused, restarting, or wedged
                return f"{node}: {type(error).__name__}: {error}"
            if problem:
                return problem
            views_by_node[node] = views
        claims = {view.node_id: (view.is_master, view.master_id)
                  for views in views_by_node.values() for view in views if "myself" in view.flags}
        for node, views in views_by_node.items():
            served = sum(view.slot_count for view in views
                         if view.is_master and not view.failing and view.port in running)
            if served != SLOTS:
                return f"{node}: {served} of {SLOTS} slots served by running masters"
            known = {view.port for view in views if not view.failing and view.connected}
            if missing := running - known:
                return f"{node}: does not reach the nodes on ports {sorted(missing)}"
            for view in views:
                claim = claims.get(view.node_id)
                if claim is not None and (view.is_master, view.master_id) != claim:
                    return f"{node}: has an old idea of the node on port {view.port}"
        return None

    @staticmethod
    def _node_problem(node: RedisNode) -> tuple[str | None, list[NodeView]]:
        """What is wrong with one node by itself, and its CLUSTER NODES."""
        with node.client() as client:
            state = client.cluster("info").get("cluster_state")
            if state != "ok":
                return f"{node}: cluster_state {state}", []
            persistence = client.info("persistence")
            if any(int(persistence.get(flag, 0)) for flag in SETTLING_FLAGS):
                # Not settled: it cannot even shut down while it writes its initial AOF.
                return f"{node}: still loading or rewriting its AOF", []
            replication = client.info("replication")
            link = replication.get("master_link_status")
            if replication["role"] == "slave" and link != "up":
                return f"{node}: replica with master link {link}", []
            return None, parse_cluster_nodes(str(client.execute_command("CLUSTER", "NODES")))

    def wait_healthy(self, timeout: float = HEALTHY_TIMEOUT_S) -> None:
        problems: list[str] = []

        def healthy() -> bool | None:
            problem = self.health_problem()
            problems[:] = [problem] if problem else []
            return True if problem is None else None

        try:
            _poll("cluster healthy", healthy, timeout)
        except ClusterTimeoutError as error:
            raise ClusterTimeoutError(f"{error}: {problems[0] if problems else ''}") from None

    def wait_failover(self, old_master: RedisNode,
                      timeout: float = HEALTHY_TIMEOUT_S) -> RedisNode:
        """After kill(old_master): wait until one of its replicas is a master and the
        cluster is healthy without it; return the promoted node."""
        if not old_master.replicas_when_killed:
            raise ClusterError(f"{old_master} was not a master with replicas when killed")
        candidates = [node for node in self._nodes
                      if node.node_id in old_master.replicas_when_killed]

        def promoted() -> RedisNode | None:
            for node in candidates:
                if node.running and node.role() == "master":
                    return node
            return None

        node = _poll(f"a replica of {old_master} promoted", promoted, timeout)
        self.wait_healthy(timeout)
        return node

    # -- admin on every node -------------------------------------------------------

    def config_set(self, param: str, value: str) -> None:
        """CONFIG SET on every running node (replicas too: a failover promotes them)."""
        for node in self._nodes:
            if node.running:
                with node.client() as client:
                    client.config_set(param, value)

    def config_get(self, param: str) -> dict[int, str]:
        """The parameter's value on every running node, by port."""
        values = {}
        for node in self._nodes:
            if node.running:
                with node.client() as client:
                    values[node.port] = str(client.config_get(param)[param])
        return values

    def flushall(self) -> None:
        for node in self.masters():
            with node.client() as client:
                client.flushall()

    def dbsize_total(self) -> int:
        total = 0
        for node in self.masters():
            with node.client() as client:
                total += int(client.dbsize())
        return total

    def collect_logs(self, dest_dir: Path) -> list[Path]:
        dest_dir.mkdir(parents=True, exist_ok=True)
        copied = []
        for node in self._nodes:
            if node.log_path.exists():
                copied.append(Path(shutil.copyfile(node.log_path,
                                                   dest_dir / f"redis-{node.port}.log")))
        return copied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tmem_host.remote.cluster",
                                     description="A local Redis Cluster for manual tests.")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start a cluster in DIR until Ctrl-C")
    up.add_argument("dir", type=Path)
    up.add_argument("--masters", type=int, default=3)
    up.add_argument("--replicas", type=int, default=1, help="replicas per master")
    args = parser.parse_args(argv)
    # SIGTERM stops the cluster like Ctrl-C does; SIGINT also when a shell
    # started us in the background with it ignored.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with LocalCluster(args.dir, masters=args.masters,
                      replicas_per_master=args.replicas) as cluster:
        print(cluster.seed_spec, flush=True)
        try:
            while True:
                signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
