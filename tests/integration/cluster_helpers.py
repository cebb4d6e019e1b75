"""A real Redis Cluster on loopback for the tests (no tests in here): three redis-server
primaries on free ports, the 16384 slots spread over them by `redis-cli --cluster create`."""

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
    every write is on disk (AOF, fsync always), so the nodes can be killed and restarted with their data."""

    def __init__(self, *, persistent: bool = False) -> None:
        self.persistent = persistent
        self.directory: Path | None = None
        self.ports: list[int] = []
        self.processes: list[subprocess.Popen] = []

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
        self.ports = [cluster_port() for _ in range(NODES)]
        self._launch()
        create = subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=60, check=False,
        )
        if create.returncode != 0:
            raise ClusterUnavailable(f"redis-cli --cluster create failed: {create.stdout[-2000:]}{create.stderr}")
        self._wait_ok()
        return self

    def kill(self) -> None:
        """SIGKILL every node: the whole cluster is gone."""
        for process in self.processes:
            process.kill()
            process.wait()
        self.processes = []

    def restart(self) -> None:
        """The nodes again, on their ports, from their cluster config (and data, if persistent)."""
        assert self.persistent and not self.processes
        self._launch()
        self._wait_ok()

    def _launch(self) -> None:
        assert self.directory is not None
        aof = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        for port in self.ports:
            self.processes.append(subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", str(self.directory / f"nodes-{port}.conf"), "--save", "", *aof,
                 "--appendfilename", f"appendonly-{port}.aof", "--appenddirname", f"aof-{port}",
                 "--dir", str(self.directory), "--logfile", f"redis-{port}.log"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))
        self._wait(lambda port: self._node(port).ping(), "the nodes to answer")

    def _wait_ok(self) -> None:
        self._wait(lambda port: self._node(port).cluster("INFO").get("cluster_state") == "ok",
                   "cluster_state:ok on every node")

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
        for port in self.ports:
            while True:
                try:
                    if check(port):
                        break
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    raise ClusterUnavailable(f"timed out after {timeout:g}s waiting for {what} (port {port})")
                time.sleep(0.05)
