"""A local ClickHouse cluster for trying the cluster engine (`make cluster`) and for the tests.

2 shards x 2 replicas of ClickHouse (Debian's clickhouse-server 18.16) and a standalone ZooKeeper
(Debian's zookeeper 3.8), everything on 127.0.0.1 only, on free ports chosen here, under one
directory:

    with Cluster().start() as cluster:
        cluster.hosts()          # "127.0.0.1:p1,127.0.0.1:p2,..."
        cluster.kill_node(0); cluster.start_node(0)
        cluster.kill_zookeeper(); cluster.start_zookeeper()

What bringing such a cluster up taught (each probe has a timeout): ZooKeeper is ready once `srvr`
says `Mode: standalone` (`ruok` answers earlier, and a ClickHouse 18.16 started then has crashed
in its ZooKeeper client); 18.16 refuses to start without a logger, a default profile,
mark_cache_size, a quota and networks for its user. Processes are stopped with SIGKILL (SIGTERM
costs seconds and nothing here needs a clean shutdown); children get PR_SET_PDEATHSIG, so they
die with the thread that started them even when this process is killed.

`python -m abstream.clickhouse.cluster` (what `make cluster` runs) starts one, creates the schema
and serves `abstream serve --engine clickhouse` on it in the foreground; Ctrl-C or SIGTERM stops
everything it started.
"""

from __future__ import annotations

import atexit
import ctypes
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

HOST = "127.0.0.1"
CLICKHOUSE_SERVER = shutil.which("clickhouse-server") or "/usr/sbin/clickhouse-server"
JAVA = shutil.which("java") or "/usr/bin/java"
ZOOKEEPER_CLASSPATH = "/usr/share/java/zookeeper.jar:/usr/share/java/slf4j-nop.jar"
ZOOKEEPER_JVM_OPTIONS = ["-Xmx256m", "-XX:+UseSerialGC"]

PROBE_TIMEOUT = 2.0  # seconds, for every single readiness probe
POLL_INTERVAL = 0.05


class ClusterError(RuntimeError):
    """The cluster could not be brought up (the message has the end of the failing log)."""


# --------------------------------------------------------------------------- configs

ZOO_CFG = """\
tickTime=500
initLimit=10
syncLimit=5
dataDir={data_dir}
clientPort={port}
clientPortAddress={host}
maxClientCnxns=0
admin.enableServer=false
4lw.commands.whitelist=ruok,srvr
forceSync=no
preAllocSize=4096
"""

CONFIG_XML = """\
<?xml version="1.0"?>
<yandex>
    <logger>
        <level>{log_level}</level>
        <log>{dir}/log/clickhouse-server.log</log>
        <errorlog>{dir}/log/clickhouse-server.err.log</errorlog>
        <size>100M</size>
        <count>2</count>
    </logger>
    <listen_host>{host}</listen_host>
    <http_port>{http_port}</http_port>
    <tcp_port>{tcp_port}</tcp_port>
    <interserver_http_port>{interserver_port}</interserver_http_port>
    <interserver_http_host>{host}</interserver_http_host>
    <max_connections>1024</max_connections>
    <keep_alive_timeout>3</keep_alive_timeout>
    <max_concurrent_queries>100</max_concurrent_queries>
    <uncompressed_cache_size>268435456</uncompressed_cache_size>
    <mark_cache_size>268435456</mark_cache_size>
    <path>{dir}/data/</path>
    <tmp_path>{dir}/tmp/</tmp_path>
    <user_files_path>{dir}/user_files/</user_files_path>
    <format_schema_path>{dir}/format_schemas/</format_schema_path>
    <users_config>{dir}/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mlock_executable>false</mlock_executable>
    <remote_servers>
{remote_servers}
    </remote_servers>
    <zookeeper>
        <node>
            <host>{host}</host>
            <port>{zookeeper_port}</port>
        </node>
        <session_timeout_ms>3000</session_timeout_ms>
    </zookeeper>
    <macros>
        <shard>{shard}</shard>
        <replica>{replica_name}</replica>
    </macros>
    <distributed_ddl>
        <path>/clickhouse/task_queue/ddl</path>
    </distributed_ddl>
    <max_session_timeout>3600</max_session_timeout>
    <default_session_timeout>60</default_session_timeout>
</yandex>
"""

USERS_XML = """\
<?xml version="1.0"?>
<yandex>
    <profiles>
        <default>
        </default>
    </profiles>
    <users>
        <default>
            <password></password>
            <networks>
                <ip>127.0.0.1</ip>
            </networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas>
        <default>
            <interval>
                <duration>3600</duration>
                <queries>0</queries>
                <errors>0</errors>
                <result_rows>0</result_rows>
                <read_rows>0</read_rows>
                <execution_time>0</execution_time>
            </interval>
        </default>
    </quotas>
</yandex>
"""


# --------------------------------------------------------------------------- helpers

def free_ports(count: int) -> list[int]:
    """Ask the kernel for `count` distinct free ports on 127.0.0.1.

    All sockets are held open until every port is chosen, then closed: the
    servers need fixed numbers in their configs, so a small race remains.
    """
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _spawn(argv: list[str], cwd: Path, output: Path) -> subprocess.Popen:
    with open(output, "ab") as out:
        return subprocess.Popen(
            argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent,
        )


def _kill(process: Optional[subprocess.Popen]) -> None:
    if process is not None and process.poll() is None:
        process.kill()
    if process is not None:
        process.wait(timeout=30)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no %s)" % path


def four_letter_word(port: int, word: str, timeout: float = PROBE_TIMEOUT) -> str:
    """Send a ZooKeeper four-letter command; return the answer ('' on any error)."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(word.encode())
            chunks = []
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")
    except OSError:
        return ""


def http_query(port: int, query: str, timeout: float = PROBE_TIMEOUT) -> str:
    """Run a query over ClickHouse's HTTP interface; raises on any error."""
    url = "http://%s:%d/?%s" % (HOST, port, urllib.parse.urlencode({"query": query}))
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def _wait(what: str, ready, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise ClusterError("%s exited with code %s before it was ready; log tail:\n%s"
                               % (what, process.returncode, _tail(log)))
        try:
            if ready():
                return
        except Exception:  # noqa: BLE001 - any failed probe just means "not yet"
            pass
        if time.monotonic() > deadline:
            raise ClusterError("%s not ready after %.0f s; log tail:\n%s" % (what, timeout, _tail(log)))
        time.sleep(POLL_INTERVAL)


# --------------------------------------------------------------------------- cluster

@dataclass
class Node:
    shard: int          # 1-based, as in the {shard} macro
    replica: int        # 1-based within the shard
    tcp_port: int
    http_port: int
    interserver_port: int
    directory: Path
    process: Optional[subprocess.Popen] = None

    @property
    def name(self) -> str:  # the {replica} macro
        return "s%dr%d" % (self.shard, self.replica)

    @property
    def config_path(self) -> Path:
        return self.directory / "config.xml"

    @property
    def log_path(self) -> Path:
        return self.directory / "log" / "clickhouse-server.log"

    @property
    def err_log_path(self) -> Path:
        return self.directory / "log" / "clickhouse-server.err.log"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class Cluster:
    cluster_name: str = "abstream"
    shards: int = 2
    replicas: int = 2
    startup_timeout: float = 60.0
    keep_directory: bool = False  # keep a temporary directory after stop()
    log_level: str = "information"  # clickhouse logger level: trace, debug, information, warning...

    directory: Optional[Path] = field(default=None, init=False)
    zookeeper_port: int = field(default=0, init=False)
    zookeeper_process: Optional[subprocess.Popen] = field(default=None, init=False)
    nodes: list[Node] = field(default_factory=list, init=False)
    _temporary: bool = field(default=False, init=False)

    # ----------------------------------------------------------------- lifecycle

    def start(self, directory: Path | None = None) -> "Cluster":
        if self.nodes:
            raise ClusterError("cluster already started")
        if directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="chcluster-"))
            self._temporary = True
        else:
            self.directory = Path(directory).resolve()
            self.directory.mkdir(parents=True, exist_ok=True)
        ports = free_ports(1 + 3 * self.shards * self.replicas)
        self.zookeeper_port = ports.pop()
        for shard in range(1, self.shards + 1):
            for replica in range(1, self.replicas + 1):
                node = Node(shard, replica, ports.pop(), ports.pop(), ports.pop(),
                            self.directory / ("s%dr%d" % (shard, replica)))
                self.nodes.append(node)
        atexit.register(self.stop)
        try:
            self._write_configs()
            self.start_zookeeper()
            for node in self.nodes:
                self._spawn_node(node)
            for node in self.nodes:
                self._wait_node(node)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGKILL every process and wait for it; remove a temporary directory."""
        atexit.unregister(self.stop)
        for node in self.nodes:
            _kill(node.process)
        _kill(self.zookeeper_process)
        if self._temporary and not self.keep_directory and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> "Cluster":
        if not self.nodes:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------------- addresses

    def hosts(self) -> str:
        return ",".join("%s:%d" % (HOST, node.tcp_port) for node in self.nodes)

    def node(self, shard: int, replica: int) -> Node:
        return next(n for n in self.nodes if n.shard == shard and n.replica == replica)

    def processes(self) -> list[subprocess.Popen]:
        procs = [self.zookeeper_process] + [n.process for n in self.nodes]
        return [p for p in procs if p is not None and p.poll() is None]

    # ----------------------------------------------------------------- zookeeper

    @property
    def zookeeper_dir(self) -> Path:
        return self.directory / "zookeeper"

    def zookeeper_ready(self) -> bool:
        return "Mode: standalone" in four_letter_word(self.zookeeper_port, "srvr")

    def start_zookeeper(self, timeout: float | None = None) -> None:
        if self.zookeeper_process is not None and self.zookeeper_process.poll() is None:
            raise ClusterError("ZooKeeper is already running")
        argv = [JAVA, *ZOOKEEPER_JVM_OPTIONS, "-cp", ZOOKEEPER_CLASSPATH,
                "org.apache.zookeeper.server.ZooKeeperServerMain", str(self.zookeeper_dir / "zoo.cfg")]
        log = self.zookeeper_dir / "zookeeper.out"
        self.zookeeper_process = _spawn(argv, self.zookeeper_dir, log)
        # "ruok" answers before the server is serving; "srvr" says "Mode: standalone" only then.
        _wait("ZooKeeper", self.zookeeper_ready, self.zookeeper_process, log,
              timeout or self.startup_timeout)

    def kill_zookeeper(self) -> None:
        _kill(self.zookeeper_process)

    # ----------------------------------------------------------------- clickhouse

    def node_ready(self, node: Node, zookeeper: bool = True) -> bool:
        """One probe: /ping answers; with zookeeper=True also a ZooKeeper round trip works and
        no replicated table is read-only."""
        with urllib.request.urlopen("http://%s:%d/ping" % (HOST, node.http_port),
                                    timeout=PROBE_TIMEOUT) as response:
            if response.read().strip() != b"Ok.":
                return False
        if zookeeper:
            http_query(node.http_port, "SELECT count() FROM system.zookeeper WHERE path = '/'")
            # replicated tables (if any) have (re)activated their replica
            if http_query(node.http_port, "SELECT count() FROM system.replicas WHERE is_readonly").strip() != "0":
                return False
        return True

    def start_node(self, i: int, timeout: float | None = None, zookeeper: bool = True) -> None:
        """(Re)start node i (index into `nodes`) and wait until it is ready.

        With zookeeper=True (default) readiness includes a ZooKeeper round trip (so
        ZooKeeper must be up); pass zookeeper=False to wait for /ping only.
        """
        node = self.nodes[i]
        if node.alive:
            raise ClusterError("node %s is already running" % node.name)
        # A server killed just after an insert may hold a part ZooKeeper no longer lists (a
        # mutation replaced it meanwhile); it then refuses to start, or to attach that table ("The
        # local set of parts ... doesn't look like the set of parts in ZooKeeper"). ClickHouse's
        # recovery, as an operator would do it: the flag, which it removes once it has started.
        flags = node.directory / "data" / "flags"
        flags.mkdir(parents=True, exist_ok=True)
        (flags / "force_restore_data").touch()
        self._spawn_node(node)
        self._wait_node(node, timeout, zookeeper)

    def kill_node(self, i: int) -> None:
        _kill(self.nodes[i].process)

    def _spawn_node(self, node: Node) -> None:
        node.process = _spawn([CLICKHOUSE_SERVER, "--config-file=%s" % node.config_path],
                              node.directory, node.directory / "log" / "stdout.log")

    def _wait_node(self, node: Node, timeout: float | None = None, zookeeper: bool = True) -> None:
        _wait("clickhouse %s" % node.name, lambda: self.node_ready(node, zookeeper), node.process,
              node.err_log_path, timeout or self.startup_timeout)

    # ----------------------------------------------------------------- configs

    def _remote_servers(self) -> str:
        shards = []
        for shard in range(1, self.shards + 1):
            replicas = "".join(
                "\n                <replica><host>%s</host><port>%d</port></replica>" % (HOST, n.tcp_port)
                for n in self.nodes if n.shard == shard)
            shards.append("            <shard>\n                <internal_replication>true"
                          "</internal_replication>%s\n            </shard>" % replicas)
        return "        <%s>\n%s\n        </%s>" % (self.cluster_name, "\n".join(shards), self.cluster_name)

    def _write_configs(self) -> None:
        self.zookeeper_dir.mkdir(parents=True, exist_ok=True)
        (self.zookeeper_dir / "data").mkdir(exist_ok=True)
        (self.zookeeper_dir / "zoo.cfg").write_text(ZOO_CFG.format(
            data_dir=self.zookeeper_dir / "data", port=self.zookeeper_port, host=HOST))
        remote_servers = self._remote_servers()
        for node in self.nodes:
            for sub in ("data", "tmp", "log", "user_files", "format_schemas"):
                (node.directory / sub).mkdir(parents=True, exist_ok=True)
            node.config_path.write_text(CONFIG_XML.format(
                dir=node.directory, host=HOST, log_level=self.log_level, http_port=node.http_port,
                tcp_port=node.tcp_port, interserver_port=node.interserver_port, remote_servers=remote_servers,
                zookeeper_port=self.zookeeper_port, shard=node.shard, replica_name=node.name))
            (node.directory / "users.xml").write_text(USERS_XML)


# --------------------------------------------------------------------------- make cluster

def main(argv: list[str] | None = None) -> int:
    """Starts a cluster, creates the schema, and serves on it until Ctrl-C or SIGTERM."""
    import argparse
    import os
    import sys

    parser = argparse.ArgumentParser(prog="python -m abstream.clickhouse.cluster", description=main.__doc__)
    parser.add_argument("--addr", default=os.environ.get("ABSTREAM_ADDR") or "127.0.0.1:50051",
                        help="where abstream serves gRPC (env ABSTREAM_ADDR)")
    parser.add_argument("--dir", type=Path, default=None, help="the cluster's directory (default: a temporary one)")
    parser.add_argument("--database", default="ab")
    args = parser.parse_args(argv)
    for binary in (CLICKHOUSE_SERVER, JAVA):
        if not Path(binary).exists():
            print(f"{binary} is not installed: `apt-get install clickhouse-server zookeeper` (what make test installs)",
                  file=sys.stderr)
            return 1
    cluster = Cluster()

    def stop(signum, frame) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        cluster.start(args.dir)
        print(f"cluster {cluster.cluster_name}: 2 shards x 2 replicas at {cluster.hosts()}, ZooKeeper on "
              f"127.0.0.1:{cluster.zookeeper_port}, in {cluster.directory}", flush=True)
        common = ["--clickhouse", cluster.hosts(), "--clickhouse-cluster", cluster.cluster_name,
                  "--clickhouse-database", args.database]
        abstream = [sys.executable, "-m", "abstream.clients.cli"]
        subprocess.run([*abstream, "clickhouse", "init", *common], check=True)
        server = subprocess.Popen([*abstream, "serve", "--engine", "clickhouse", "--addr", args.addr, "--data-dir", "",
                                   *common])
        try:
            return server.wait()
        except KeyboardInterrupt:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
            return 0
    except KeyboardInterrupt:
        return 0
    except (ClusterError, subprocess.CalledProcessError) as error:
        print(f"make cluster: {error}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()


if __name__ == "__main__":
    raise SystemExit(main())
