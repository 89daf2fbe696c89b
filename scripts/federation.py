"""A federation of real Flower processes on this machine: create, start, inspect and stop it.

One SuperLink and N SuperNodes, with TLS (certificates from scripts/make_certs.py), SuperNode
authentication (one ECDSA P-384 key per node, registered with `flwr supernode register`), each
node with its own data and its own `state-dir`, and a `flwr` connection in
`<dir>/flwr-home/config.toml`. The command line is `scripts/launch_federation.py`; tests and
benchmarks drive `Federation` directly.

The Flower release is the one in `bin_dir` (the CLI's default: beside the Python that runs it):
flwr 1.36 and older speak gRPC on the Fleet API (separate Fleet, Control and Runtime ports);
1.37 and newer serve Fleet, Control and Runtime APIs over HTTPS on one port.
Every process gets an environment marker, so `stop` also finds the ServerApp, ClientApp and
SuperExec processes that Flower starts detached from its own process group.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from scripts.make_certs import make_certs

REPO = Path(__file__).resolve().parents[1]
STATE_FILE = "federation.json"
MEMBER_ENV = "BAYESFL_FEDERATION_MEMBER"
SUPERLINK = "superlink"
# The last release whose Fleet API is gRPC; 1.37 moved the SuperNode-SuperLink link to HTTP(S).
LAST_GRPC_RELEASE = (1, 36)


class FederationError(RuntimeError):
    """A process did not start, a node was not accepted, or a wait timed out."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def flower_version(bin_dir: Path) -> tuple[int, int, int]:
    out = subprocess.run(
        [str(bin_dir / "flower-superlink"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"(\d+)\.(\d+)\.(\d+)", out)
    if match is None:
        raise FederationError(f"cannot read the Flower version from {out!r}")
    return tuple(int(g) for g in match.groups())  # type: ignore[return-value]


def json_reply(stdout: str) -> dict:
    """What a `flwr ... --format json` call printed, or {} when it printed no JSON (it crashed)."""
    try:
        reply = json.loads(stdout)
    except json.JSONDecodeError:
        return {}
    return reply if isinstance(reply, dict) else {}


def toml_string(value: str) -> str:
    # A JSON string literal is a valid TOML basic string.
    return json.dumps(value)


@dataclass
class Node:
    index: int
    node_config: str
    port: int  # the SuperNode's local Runtime API (its ClientApps connect to it)
    key: str  # private key path; the public key is beside it with .pub
    registered: bool
    pid: int | None = None


@dataclass
class FederationSpec:
    """Everything needed to (re)start or stop the processes; saved as <dir>/federation.json."""

    bin_dir: str
    version: tuple[int, int, int]
    bind: str  # address the SuperLink listens on for SuperNodes and users
    connection: str
    ports: dict[str, int]
    nodes: list[Node] = field(default_factory=list)
    superlink_pid: int | None = None

    @property
    def grpc_fleet(self) -> bool:
        return tuple(self.version[:2]) <= LAST_GRPC_RELEASE


class Federation:
    """The processes of one federation, rooted in a directory that holds all its files."""

    def __init__(self, root: Path, spec: FederationSpec) -> None:
        self.root = root.resolve()
        self.spec = spec
        # Processes started by this object, by member name (the CLI's later calls use pids).
        self.procs: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------ layout

    @property
    def bin_dir(self) -> Path:
        return Path(self.spec.bin_dir)

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def flwr_home(self) -> Path:
        """FLWR_HOME for the `flwr` CLI: its config.toml holds the connection."""
        return self.root / "flwr-home"

    def log_path(self, member: str) -> Path:
        return self.root / "logs" / f"{member}.log"

    def node_dir(self, index: int) -> Path:
        return self.root / "nodes" / f"node-{index}"

    def state_dir(self, index: int) -> Path:
        return self.node_dir(index) / "state"

    def node(self, index: int) -> Node:
        return self.spec.nodes[index]

    @property
    def control_address(self) -> str:
        """What the `flwr` CLI dials: the Control API (1.36) or the single HTTPS port."""
        port = self.spec.ports["control"] if self.spec.grpc_fleet else self.spec.ports["superlink"]
        return f"127.0.0.1:{port}"

    @property
    def fleet_address(self) -> str:
        """What SuperNodes dial."""
        port = self.spec.ports["fleet"] if self.spec.grpc_fleet else self.spec.ports["superlink"]
        return f"127.0.0.1:{port}"

    # ------------------------------------------------------------------ creation

    @classmethod
    def create(
        cls,
        root: Path,
        num_nodes: int,
        bin_dir: Path,
        data_paths: list[str] | None = None,
        bind: str = "127.0.0.1",
        extra_names: list[str] | None = None,
        connection: str = "bayesfl",
    ) -> Federation:
        """Certificates, node keys and free ports for a new federation (no process yet)."""
        root = root.resolve()
        if (root / STATE_FILE).exists():
            raise FederationError(f"{root} already holds a federation; stop it or use another --dir")
        if data_paths and len(data_paths) != num_nodes:
            raise FederationError(f"{len(data_paths)} --data-path for {num_nodes} nodes")
        bin_dir = bin_dir.resolve()
        version = flower_version(bin_dir)
        spec = FederationSpec(
            bin_dir=str(bin_dir), version=version, bind=bind, connection=connection, ports={}
        )
        if spec.grpc_fleet:
            spec.ports = {"fleet": free_port(), "control": free_port(), "runtime": free_port()}
        else:
            spec.ports = {"superlink": free_port()}
        fed = cls(root, spec)
        (root / "logs").mkdir(parents=True, exist_ok=True)
        make_certs(fed.certs, extra_names or ())
        for index in range(num_nodes):
            data = data_paths[index] if data_paths else None
            fed.add_node(index, num_nodes, data_path=data, register=True)
        fed.write_connection()
        fed.save()
        return fed

    def add_node(
        self, index: int, num_partitions: int, data_path: str | None = None, register: bool = True
    ) -> Node:
        """A node's key, state folder and node config; `register=False` makes an intruder."""
        key = self.root / "keys" / f"node-{index}"
        key.parent.mkdir(parents=True, exist_ok=True)
        if not key.exists():
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(key)],
                check=True, capture_output=True,
            )
        self.state_dir(index).mkdir(parents=True, exist_ok=True)
        data = (
            f"data-path={toml_string(data_path)}"
            if data_path
            else f"partition-id={index} num-partitions={num_partitions}"
        )
        node = Node(
            index=index,
            node_config=f"{data} state-dir={toml_string(str(self.state_dir(index)))}",
            port=free_port(),
            key=str(key),
            registered=register,
        )
        if index < len(self.spec.nodes):
            self.spec.nodes[index] = node
        else:
            self.spec.nodes.append(node)
        return node

    def write_connection(self) -> Path:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        path = self.flwr_home / "config.toml"
        path.write_text(
            "[superlink]\n"
            f"default = {toml_string(self.spec.connection)}\n\n"
            f"[superlink.{self.spec.connection}]\n"
            f"address = {toml_string(self.control_address)}\n"
            f"root-certificates = {toml_string(str(self.certs / 'ca.crt'))}\n"
        )
        return path

    # ------------------------------------------------------------------ persistence

    def save(self) -> None:
        data = asdict(self.spec)
        (self.root / STATE_FILE).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, root: Path) -> Federation:
        path = root.resolve() / STATE_FILE
        if not path.exists():
            raise FederationError(f"no federation in {root} (no {STATE_FILE})")
        data = json.loads(path.read_text())
        data["version"] = tuple(data["version"])
        data["nodes"] = [Node(**n) for n in data["nodes"]]
        return cls(root, FederationSpec(**data))

    # ------------------------------------------------------------------ processes

    def env(self, member: str, home: Path) -> dict[str, str]:
        """The environment of one member: its own FLWR_HOME, the chosen release first on PATH
        (Flower starts `flower-superexec` and `flwr-clientapp` by name), and the marker."""
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(
            FLWR_HOME=str(home),
            PATH=f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}",
            # Nodes and server use the installed packages; no `uv sync` per run.
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            PYTHONUNBUFFERED="1",
            **{MEMBER_ENV: self.marker(member)},
        )
        return env

    def marker(self, member: str) -> str:
        return f"{self.root}#{member}"

    def _spawn(self, member: str, command: list[str], home: Path) -> int:
        home.mkdir(parents=True, exist_ok=True)
        log = self.log_path(member)
        with log.open("ab") as out:
            out.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(command)}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env(member, home), cwd=home, start_new_session=True,
            )
        self.procs[member] = proc
        return proc.pid

    def wait_exit(self, member: str, timeout: float) -> int:
        """The exit code of a member this object started; FederationError if it still runs."""
        try:
            return self.procs[member].wait(timeout)
        except subprocess.TimeoutExpired:
            raise FederationError(f"{member} still runs after {timeout:.0f}s") from None

    def superlink_command(self) -> list[str]:
        certs, ports = self.certs, self.spec.ports
        tls = [
            "--ssl-ca-certfile", str(certs / "ca.crt"),
            "--ssl-certfile", str(certs / "server.pem"),
            "--ssl-keyfile", str(certs / "server.key"),
        ]
        command = [
            str(self.bin_dir / "flower-superlink"), *tls,
            "--enable-supernode-auth",
            "--database", str(self.root / "superlink" / "state.db"),
            "--disable-runtime-dependency-installation",
        ]
        if self.spec.grpc_fleet:
            # 1.36: gRPC Fleet and Control APIs on their own ports; the Runtime API (the
            # ServerApp's link, loopback only) is HTTP and gets TLS through --appio-ssl-*.
            command += [
                "--fleet-api-type", "grpc-rere",
                "--fleet-api-address", f"{self.spec.bind}:{ports['fleet']}",
                "--control-api-address", f"{self.spec.bind}:{ports['control']}",
                "--host", "127.0.0.1", "--port", str(ports["runtime"]),
                "--appio-ssl-ca-certfile", str(certs / "ca.crt"),
                "--appio-ssl-certfile", str(certs / "server.pem"),
                "--appio-ssl-keyfile", str(certs / "server.key"),
            ]
        else:
            command += ["--host", self.spec.bind, "--port", str(ports["superlink"])]
        return command

    def supernode_command(self, node: Node) -> list[str]:
        command = [
            str(self.bin_dir / "flower-supernode"),
            "--superlink", self.fleet_address,
            "--root-certificates", str(self.certs / "ca.crt"),
            "--auth-supernode-private-key", node.key,
            "--node-config", node.node_config,
            # The node's Runtime API serves only its own ClientApp processes on loopback.
            "--host", "127.0.0.1", "--port", str(node.port),
        ]
        if self.spec.grpc_fleet:
            command.append("--grpc-rere")
        return command

    def start(self, timeout: float = 120.0) -> None:
        """SuperLink, key registration, then every node; returns once all nodes are online."""
        self.start_superlink(timeout)
        for node in self.spec.nodes:
            if node.registered:
                self.register(node)
        for node in self.spec.nodes:
            self.start_node(node.index, wait=False)
        self.wait_online([n.index for n in self.spec.nodes if n.registered], timeout)

    def start_superlink(self, timeout: float = 120.0) -> None:
        self.spec.superlink_pid = self._spawn(
            SUPERLINK, self.superlink_command(), self.root / "superlink" / "home"
        )
        self.save()
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive(SUPERLINK, self.spec.superlink_pid)
            listed = self.flwr("supernode", "list", self.spec.connection, "--format", "json")
            if listed.returncode == 0 and json_reply(listed.stdout).get("success"):
                return
            if time.monotonic() > deadline:
                raise FederationError(
                    f"SuperLink not answering after {timeout:.0f}s:\n{listed.stdout}{listed.stderr}"
                    f"\n{self.tail(SUPERLINK)}"
                )
            time.sleep(1.0)

    def register(self, node: Node) -> None:
        """Register the node's public key with the SuperLink; a key registered before (the
        database keeps registrations across SuperLink restarts) is fine."""
        done = self.flwr("supernode", "register", node.key + ".pub", self.spec.connection,
                         "--format", "json")
        reply = json_reply(done.stdout)
        if reply.get("success") or "already in use" in reply.get("error-message", ""):
            return
        raise FederationError(f"registering node {node.index} failed:\n{done.stdout}{done.stderr}")

    def start_node(self, index: int, wait: bool = True, timeout: float = 120.0) -> None:
        """Start (or restart) node `index` with its key, data and state-dir.

        The SuperLink refuses to activate a node it still counts as online, and it counts a
        node that died without saying goodbye as online until two missed heartbeats (up to
        60 s). A restart therefore first waits, up to `timeout`, for the SuperLink to see it
        offline."""
        node = self.node(index)
        if node.pid is not None and alive(node.pid):
            raise FederationError(f"node {index} is already running (pid {node.pid})")
        previous_id = self.node_id(index) if self.log_path(f"node-{index}").exists() else None
        if previous_id is not None:
            deadline = time.monotonic() + timeout
            while previous_id in self.online_node_ids():
                if time.monotonic() > deadline:
                    raise FederationError(f"SuperLink still counts node {index} online after {timeout:.0f}s")
                time.sleep(2.0)
        node.pid = self._spawn(f"node-{index}", self.supernode_command(node), self.node_dir(index) / "home")
        self.save()
        if wait:
            self.wait_online([index], timeout)

    def supernodes(self) -> list[dict]:
        listed = self.flwr("supernode", "list", self.spec.connection, "--format", "json")
        if listed.returncode != 0:
            raise FederationError(f"flwr supernode list failed:\n{listed.stdout}{listed.stderr}")
        return json.loads(listed.stdout).get("nodes", [])

    def online_node_ids(self) -> list[int]:
        return [int(n["node-id"]) for n in self.supernodes() if n.get("status") == "online"]

    def wait_online(self, indices: list[int], timeout: float = 120.0) -> None:
        """Until `indices` have said hello: each node logs its SuperNode ID once accepted."""
        deadline = time.monotonic() + timeout
        pending = set(indices)
        while pending:
            for index in sorted(pending):
                self._check_alive(f"node-{index}", self.node(index).pid)
                if self.node_id(index) is not None:
                    pending.discard(index)
            if pending and time.monotonic() > deadline:
                raise FederationError(
                    f"node(s) {sorted(pending)} not online after {timeout:.0f}s:\n"
                    + "\n".join(self.tail(f"node-{i}") for i in sorted(pending))
                )
            time.sleep(0.5)

    def node_id(self, index: int) -> int | None:
        """The SuperNode ID the SuperLink gave this node in its latest start, if any yet."""
        text = self.log_path(f"node-{index}").read_text(errors="replace")
        latest_start = text.rsplit("\n=== ", 1)[-1]
        ids = re.findall(r"SuperNode ID: (\d+)", latest_start)
        return int(ids[-1]) if ids else None

    def stop_node(self, index: int, crash: bool = False, timeout: float = 20.0) -> None:
        """Stop node `index` and the ClientApps it started; `crash` kills without warning."""
        self._kill_member(f"node-{index}", self.node(index).pid, crash, timeout)
        self.node(index).pid = None
        self.save()

    def stop(self, timeout: float = 20.0) -> None:
        """Every process of this federation, nodes first; leaves files for a later start."""
        for node in self.spec.nodes:
            self._kill_member(f"node-{node.index}", node.pid, False, timeout)
            node.pid = None
        self._kill_member(SUPERLINK, self.spec.superlink_pid, False, timeout)
        self.spec.superlink_pid = None
        # A process that was being started while its parent stopped.
        _signal_all(self.processes(), signal.SIGKILL)
        self.save()

    def remove_state(self) -> None:
        (self.root / STATE_FILE).unlink(missing_ok=True)

    # ------------------------------------------------------------------ CLI passthrough

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(FLWR_HOME=str(self.flwr_home), PATH=f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}")
        return subprocess.run(
            [str(self.bin_dir / "flwr"), *args], capture_output=True, text=True, env=env,
            cwd=REPO, timeout=timeout, stdin=subprocess.DEVNULL,
        )

    def tail(self, member: str, lines: int = 30) -> str:
        path = self.log_path(member)
        text = path.read_text(errors="replace") if path.exists() else ""
        return f"--- {path} (last {lines} lines)\n" + "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------------ process plumbing

    def _check_alive(self, member: str, pid: int | None) -> None:
        if not alive(pid):
            raise FederationError(f"{member} exited:\n{self.tail(member)}")

    def processes(self, member: str | None = None) -> list[int]:
        """Live processes started for `member`, or for any member of this federation."""
        if member is None:
            return marked_processes(self.marker(""), prefix=True)
        return marked_processes(self.marker(member), prefix=False)

    def _kill_member(self, member: str, pid: int | None, crash: bool, timeout: float) -> None:
        """SIGTERM (SIGKILL when `crash`) to the member's process group and to every other
        process with its marker: Flower starts its SuperExec and app processes in sessions
        of their own. Whatever still runs after `timeout` gets SIGKILL."""
        sig = signal.SIGKILL if crash else signal.SIGTERM
        if pid is not None and alive(pid):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                pass
        _signal_all(self.processes(member), sig)
        deadline, escalated = time.monotonic() + timeout, crash
        while remaining := self.processes(member):
            if time.monotonic() > deadline:
                if escalated:
                    raise FederationError(f"{member}: pid(s) {remaining} survive SIGKILL")
                _signal_all(remaining, signal.SIGKILL)
                deadline, escalated = time.monotonic() + timeout, True
            time.sleep(0.2)
        if member in self.procs:  # our own child: collect its exit status (no zombie)
            self.procs.pop(member).wait(timeout)


def alive(pid: int | None) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet collected by its parent, does not)."""
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def marked_processes(value: str, prefix: bool) -> list[int]:
    """Live processes whose environment sets MEMBER_ENV to `value` (or to something that starts
    with it); every descendant inherits the variable, wherever Flower reparents it."""
    wanted = f"{MEMBER_ENV}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            variables = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, a kernel thread, or another user's process
            continue
        if any(v.startswith(wanted) if prefix else v == wanted for v in variables):
            if alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
