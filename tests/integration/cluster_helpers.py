"""A real Redis Cluster on loopback for the tests (no tests in here): three redis-server
primaries on free ports (each with its replicas, if asked), the 16384 slots spread over them by
`redis-cli --cluster create`."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

NODES = 3
# A node also listens on its port + 10000 (the cluster bus), so its port must be at most 55535:
# below the kernel's ephemeral range, where free_port() would pick it.
PORTS = range(20_000, 30_000)


def cluster_port() -> int:
    """A port that is free, with its bus port (+10000) free too."""
    for _ in range(100):
        port = random.choice(PORTS)
        if all(_free(p) for p in (port, port + 10_000)):
            return port
    raise ClusterUnavailable("no free port pair for a cluster node")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class ClusterUnavailable(Exception):
    """redis-server or redis-cli is missing, or the cluster did not form."""


class LocalCluster:
    """Start with start(), stop with close() (kills the nodes, removes their directory). `persistent`:
    every write is on disk (AOF, fsync always), so the nodes can be killed and restarted with their data.
    `replicas`: per primary; `node_timeout_ms`: how long a node may be silent before the others count it
    as failed and promote its replica (Redis's default, 15 s, is too long for a test)."""

    def __init__(self, *, persistent: bool = False, replicas: int = 0, node_timeout_ms: int | None = None) -> None:
        self.persistent = persistent
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.directory: Path | None = None
        self.ports: list[int] = []
        self.processes: list[subprocess.Popen] = []
        self.killed: set[int] = set()  # ports of nodes killed by kill_node()

    @property
    def url(self) -> str:
        """Any node will do: the cluster client learns the others from it."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def url_not_owning(self, *keys: str) -> str:
        """A node that holds none of `keys`' slots: a plain client given it gets MOVED for each."""
        with redis.RedisCluster.from_url(self.url) as client:
            owners = {client.get_node_from_key(key).port for key in keys}
        free = [p for p in self.ports if p not in owners]
        if not free:
            raise AssertionError(f"every node owns one of {keys}: use fewer keys")
        return f"redis://127.0.0.1:{free[0]}/0"

    def start(self) -> LocalCluster:
        try:
            return self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> LocalCluster:
        assert self.directory is None, "started once"
        for tool in ("redis-server", "redis-cli"):
            if shutil.which(tool) is None:
                raise ClusterUnavailable(f"{tool} is not on PATH")
        self.directory = Path(tempfile.mkdtemp(prefix="decision-router-cluster-"))
        self.ports = self._distinct_ports(NODES * (1 + self.replicas))
        self._launch()
        create = subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            capture_output=True, text=True, timeout=60, check=False,
        )
        if create.returncode != 0:
            raise ClusterUnavailable(f"redis-cli --cluster create failed: {create.stdout[-2000:]}{create.stderr}")
        self._wait_ok()
        if self.replicas:
            self._wait_replicated()
        return self

    @staticmethod
    def _distinct_ports(count: int) -> list[int]:
        """`count` free ports, no two of them or their bus ports the same."""
        ports: list[int] = []
        while len(ports) < count:
            port = cluster_port()
            if not {port, port + 10_000} & {q + d for q in ports for d in (0, 10_000)}:
                ports.append(port)
        return ports

    def _wait_replicated(self) -> None:
        """Every node knows every other, and every replica has finished its first sync: a failover
        needs a majority of primaries to agree that one failed, and a replica with the data."""
        total = len(self.ports)

        def ready(port: int) -> bool:
            node = self._node(port)
            if node.cluster("INFO").get("cluster_known_nodes") != str(total):
                return False
            replication = node.info("replication")
            if replication["role"] != "master":
                return replication.get("master_link_status") == "up"
            online = [replication.get(f"slave{n}", {}).get("state") == "online" for n in range(self.replicas)]
            return replication["connected_slaves"] == self.replicas and all(online)

        self._wait(ready, "every replica in sync")

    def primary_of(self, key: str) -> int:
        """The port of the primary holding `key`'s slot, as a live node sees it."""
        node = self._node(self._live()[0])
        slot = node.execute_command("CLUSTER", "KEYSLOT", key)
        for start, end, primary, *_ in node.execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(primary[1])
        raise AssertionError(f"slot {slot} of {key} is not covered")

    def replica_of(self, port: int) -> int:
        """The port of a replica of the primary on `port`: from its replication links, which start() waited
        for (its cluster table learns of the replica by gossip, a moment later: CLUSTER REPLICAS could still
        be empty then)."""
        replication = self._node(port).info("replication")
        if not replication.get("connected_slaves"):
            raise AssertionError(f"the node on port {port} has no replica")
        return int(replication["slave0"]["port"])

    def kill_node(self, port: int) -> None:
        """SIGKILL one node: its replica takes over after node_timeout_ms."""
        process = self.processes[self.ports.index(port)]
        process.kill()
        process.wait()
        self.killed.add(port)

    def restart_node(self, port: int) -> None:
        """A node killed by kill_node() again, from its cluster config: a primary that lost its slots comes
        back as a replica of the one that took them. Returns once every primary has its replicas in sync."""
        assert port in self.killed
        self.processes[self.ports.index(port)] = self._server(port)
        self.killed.discard(port)
        self._wait_replicated()

    def wait_promoted(self, port: int, timeout: float = 30.0) -> None:
        """The node on `port` is a primary, and every live node sees all slots covered again."""
        self._wait(lambda p: p != port or self._node(p).info("replication")["role"] == "master",
                   f"the node on port {port} to be promoted", timeout)
        self._wait_ok(timeout)

    def _live(self) -> list[int]:
        return [p for p in self.ports if p not in self.killed]

    def kill(self) -> None:
        """SIGKILL every node: the whole cluster is gone."""
        for process in self.processes:
            process.kill()
            process.wait()
        self.processes = []
        self.killed.clear()

    def restart(self) -> None:
        """The nodes again, on their ports, from their cluster config (and data, if persistent)."""
        assert self.persistent and not self.processes
        self._launch()
        self._wait_ok()

    def _launch(self) -> None:
        for port in self.ports:
            self.processes.append(self._server(port))
        self._wait(lambda port: self._node(port).ping(), "the nodes to answer")

    def _server(self, port: int) -> subprocess.Popen:
        assert self.directory is not None
        aof = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        timeout = ["--cluster-node-timeout", str(self.node_timeout_ms)] if self.node_timeout_ms else []
        # A replica's first sync starts at once (Redis waits 5 s by default for more replicas to share it).
        sync = ["--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
        return subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", str(self.directory / f"nodes-{port}.conf"), "--save", "", *aof,
             "--appendfilename", f"appendonly-{port}.aof", "--appenddirname", f"aof-{port}",
             "--dir", str(self.directory), "--logfile", f"redis-{port}.log", *timeout, *sync],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def _wait_ok(self, timeout: float = 30.0) -> None:
        self._wait(lambda port: self._node(port).cluster("INFO").get("cluster_state") == "ok",
                   "cluster_state:ok on every node", timeout)

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _node(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1, decode_responses=True)

    def _wait(self, check, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        for port in self._live():
            while True:
                try:
                    if check(port):
                        break
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    raise ClusterUnavailable(f"timed out after {timeout:g}s waiting for {what} (port {port})")
                time.sleep(0.05)
