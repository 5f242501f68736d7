"""Redis deployments for tests: a Redis Cluster, a primary with replicas behind
Sentinel. Every redis-server / redis-sentinel process is started here on a
free loopback port and ended by its PID (tests/redis_support.py RedisProcess).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from tests.redis_support import REDIS_SERVER, RedisProcess
from tests.support import free_port

REDIS_CLI = shutil.which("redis-cli")


class ConfiguredRedis(RedisProcess):
    """A RedisProcess with more redis-server arguments (cluster mode, replicaof, sentinel)."""

    def __init__(self, workdir: Path, extra: list[str], appendonly: bool = True, sentinel: bool = False) -> None:
        super().__init__(workdir, appendonly=appendonly)
        self.extra = extra
        self.sentinel = sentinel

    def start(self, timeout: float = 10.0) -> ConfiguredRedis:
        if REDIS_SERVER is None:
            pytest.fail("redis-server is not installed (make test installs it)")
        if self.sentinel:
            conf = self.workdir / "sentinel.conf"
            conf.write_text(
                "\n".join(
                    [
                        f"port {self.port}",
                        "bind 127.0.0.1",
                        f"dir {self.workdir}",
                        f"logfile {self.workdir / 'redis.log'}",
                        *self.extra,
                    ]
                )
                + "\n"
            )
            args = [REDIS_SERVER, str(conf), "--sentinel"]
        else:
            args = [
                REDIS_SERVER,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.workdir),
                "--save", "",
                "--appendonly", "yes" if self.appendonly else "no",
                "--appendfsync", "always",
                "--daemonize", "no",
                "--protected-mode", "yes",
                "--logfile", str(self.workdir / "redis.log"),
                *self.extra,
            ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited: {self.log()}")
                try:
                    if client.ping():
                        return self
                except redis.RedisError:
                    time.sleep(0.02)
            raise RuntimeError(f"redis-server did not answer within {timeout}s")
        finally:
            client.close()

    def client(self, **kw) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **kw)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class RedisCluster:
    """3 primaries + 3 replicas (``redis-cli --cluster create --cluster-replicas 1``)."""

    def __init__(self, workdir: Path, primaries: int = 3, node_timeout_ms: int = 1000) -> None:
        self.nodes = [
            ConfiguredRedis(
                workdir / f"cluster-{i}",
                [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-port",
                    str(free_port()),
                    "--cluster-node-timeout",
                    str(node_timeout_ms),
                    "--cluster-replica-validity-factor",
                    "0",
                ],
            )  # fmt: skip
            for i in range(primaries * 2)
        ]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:3])

    def start(self, timeout: float = 30.0) -> RedisCluster:
        if REDIS_CLI is None:
            pytest.fail("redis-cli is not installed (make test installs it with redis-server)")
        for node in self.nodes:
            node.start()
        out = subprocess.run(
            [REDIS_CLI, "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in self.nodes],
             "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout}{out.stderr}")
        self.wait_ok(timeout)
        return self

    def wait_ok(self, timeout: float = 30.0, replicas: int = 3) -> None:
        """Until every live node says cluster_state:ok and the slots have their primaries (and replicas)."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                ok = True
                for node in self.live():
                    with node.client() as c:
                        info = c.execute_command("CLUSTER INFO")
                        if info.get("cluster_state") != "ok":
                            ok, last = False, info
                roles = self.roles()
                if ok and roles.count("master") == 3 and roles.count("slave") >= replicas:
                    return
                last = str(roles)
            except redis.RedisError as exc:
                last = str(exc)
            time.sleep(0.1)
        raise RuntimeError(f"cluster not ok within {timeout}s: {last}")

    def live(self) -> list[ConfiguredRedis]:
        return [n for n in self.nodes if n.alive]

    def roles(self) -> list[str]:
        out = []
        for node in self.live():
            with node.client() as c:
                info = c.info("replication")
                if info["role"] == "master" or info.get("master_link_status") == "up":
                    out.append(info["role"])
        return out

    def primaries(self) -> list[ConfiguredRedis]:
        return [n for n in self.live() if n.client().info("replication")["role"] == "master"]

    def primary_for(self, key: str) -> ConfiguredRedis:
        """The node serving ``key``'s slot now."""
        node = self.live()[0]
        with node.client() as c:
            slot = c.execute_command("CLUSTER KEYSLOT", key)
            for start, end, primary, *_ in c.execute_command("CLUSTER SLOTS"):
                if start <= slot <= end:
                    return next(n for n in self.nodes if n.port == int(primary[1]))
        raise RuntimeError(f"no primary for {key}")

    def migrate_slot(self, key: str, to: ConfiguredRedis, batch: int = 1, pause: float = 0.02) -> int:
        """Move ``key``'s slot to primary ``to`` the way ``redis-cli --cluster reshard`` does, slowly.

        IMPORTING on the target, MIGRATING on the source, then MIGRATE of
        ``batch`` keys at a time with ``pause`` seconds between (so traffic
        meets the slot half moved: ASK redirections and TRYAGAIN for scripts
        whose keys are split), then SETSLOT NODE on every primary. Returns
        how many keys moved.
        """
        source = self.primary_for(key)
        assert source.port != to.port, "the slot is on that primary already"
        with source.client() as src, to.client() as dst:
            slot = src.execute_command("CLUSTER KEYSLOT", key)
            src_id, dst_id = src.execute_command("CLUSTER MYID"), dst.execute_command("CLUSTER MYID")
            dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
            src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
            moved = 0
            while True:
                keys = src.execute_command("CLUSTER GETKEYSINSLOT", slot, batch)
                if not keys:
                    break
                src.execute_command("MIGRATE", "127.0.0.1", to.port, "", 0, 5000, "KEYS", *keys)
                moved += len(keys)
                time.sleep(pause)
            for node in self.primaries():
                with node.client() as c:
                    c.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
        return moved

    def stop(self) -> None:
        for node in self.nodes:
            try:
                node.resume()
            except Exception:
                pass
            node.stop()


class SentinelGroup:
    """One primary, its replicas and three Sentinels watching it (quorum 2)."""

    MASTER = "collab"

    def __init__(self, workdir: Path, replicas: int = 2, sentinels: int = 3, down_after_ms: int = 1000) -> None:
        self.primary = ConfiguredRedis(workdir / "primary", [])
        self.replicas = [
            ConfiguredRedis(workdir / f"replica-{i}", ["--replicaof", "127.0.0.1", "PORT"]) for i in range(replicas)
        ]
        self.sentinels = [
            ConfiguredRedis(
                workdir / f"sentinel-{i}",
                [
                    "sentinel monitor collab 127.0.0.1 PORT 2",
                    f"sentinel down-after-milliseconds collab {down_after_ms}",
                    "sentinel failover-timeout collab 5000",
                    "sentinel parallel-syncs collab 2",
                ],
                sentinel=True,
            )
            for i in range(sentinels)
        ]

    @property
    def servers(self) -> list[ConfiguredRedis]:
        return [self.primary, *self.replicas]

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels) + f"/{self.MASTER}"

    def start(self, timeout: float = 30.0) -> SentinelGroup:
        self.primary.start()
        for node in [*self.replicas, *self.sentinels]:
            node.extra = [a.replace("PORT", str(self.primary.port)) for a in node.extra]
            node.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            linked = 0
            for replica in self.replicas:  # synced, not just connected
                with replica.client() as c:
                    linked += c.info("replication").get("master_link_status") == "up"
            known = 0
            for s in self.sentinels:
                with s.client() as c:
                    try:
                        known += c.sentinel_master(self.MASTER)["num-other-sentinels"] == len(self.sentinels) - 1
                    except redis.RedisError:
                        pass
            if linked == len(self.replicas) and known == len(self.sentinels):
                return self
            time.sleep(0.1)
        raise RuntimeError("sentinel group not ready")

    def current_primary(self) -> ConfiguredRedis:
        with self.sentinels[0].client() as c:
            host, port = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.MASTER)
        return next(s for s in self.servers if s.port == int(port))

    def stop(self) -> None:
        for node in [*self.sentinels, *self.servers]:
            try:
                node.resume()
            except Exception:
                pass
            node.stop()


def kill9(node: ConfiguredRedis) -> None:
    os.kill(node.proc.pid, signal.SIGKILL)
    node.proc.wait(10)


@pytest.fixture
def redis_cluster(tmp_path):
    cluster = RedisCluster(tmp_path / "cluster")
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture
def sentinel_group(tmp_path):
    group = SentinelGroup(tmp_path / "sentinel")
    try:
        yield group.start()
    finally:
        group.stop()
