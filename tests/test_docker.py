"""The Docker deployment in docker/, built and run for real.

The `docker` tests build the images and run the compose files to `finished:completed`:
  * one host: compose.yml + compose.tls.yml (certificates from compose.certs.yml), both nodes on
    their own data from host folders, results in a host folder, the SuperLink's state surviving
    a restart;
  * across hosts, played on one host: compose.server.yml and two projects of compose.node.yml.
The `flwr` CLI on this machine submits the runs through the SuperLink's port, published on
127.0.0.1 only. They are skipped only when no Docker engine answers (`docker info`).

Docker Hub is not needed: Flower's images are stood in for by docker/flwr.Dockerfile built on a
local Python image (BAYESFL_DOCKER_PYTHON_IMAGE, default local/debian-py:bookworm), which the
tests make with debootstrap when it is missing. Pip inside the builds gets this machine's CA
bundle and, when there is one, its local CPU torch wheel from a small HTTP server on 127.0.0.1
(build args EXTRA_CA_URL, EXTRA_FIND_LINKS), so nothing of either is left in the images.
"""

from __future__ import annotations

import functools
import http.server
import importlib.metadata
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from pathlib import Path

import numpy as np
import pytest

APP_DIR = Path(__file__).resolve().parents[1]
DOCKER_DIR = APP_DIR / "docker"
FLWR_VERSION = importlib.metadata.version("flwr")
PYTHON_IMAGE = os.environ.get("BAYESFL_DOCKER_PYTHON_IMAGE", "local/debian-py:bookworm")
FLWR_IMAGES = {c: f"local/flwr-{c}:{FLWR_VERSION}" for c in ("superlink", "supernode", "superexec")}
APP_IMAGE = "bayesfl-superexec:test"
EXTRAS_PORT = 47391  # a fixed port keeps the build args, and so the build cache, stable
CA_BUNDLES = (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"),
              "/etc/ssl/certs/ca-certificates.crt")
RUN_TIMEOUT = 1500  # seconds; each round starts fresh ClientApp processes that import torch
SLOW = 1800  # seconds for builds and container creation (vfs storage copies whole images)
# Every setting the compose files read; the tests set their own and inherit none of these.
COMPOSE_SETTINGS = {
    name for f in DOCKER_DIR.glob("compose*.yml") for name in re.findall(r"\$\{(\w+)", f.read_text())
}


def sh(*cmd: str, timeout: float = SLOW, check: bool = True, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        )
    return done


@functools.cache
def engine_problem() -> str | None:
    """Why no Docker engine can be used, or None when `docker info` answers."""
    if shutil.which("docker") is None:
        return "no `docker` command"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 60 s"
    if info.returncode != 0:
        return f"`docker info` failed: {(info.stderr or info.stdout).strip()[-300:]}"
    return None


def requires_engine():
    problem = engine_problem()
    if problem is not None:
        pytest.skip(f"No Docker engine reachable ({problem}); start one to run the Docker tests")


@functools.cache
def compose_cmd() -> tuple[str, ...]:
    """docker-compose (v1) where installed, else the `docker compose` plugin (v2)."""
    if shutil.which("docker-compose"):
        return ("docker-compose",)
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ("docker", "compose")
    raise AssertionError("a Docker engine answers but neither docker-compose nor `docker compose` exists")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flwr_cli() -> str:
    beside = Path(sys.executable).with_name("flwr")
    return str(beside) if beside.exists() else "flwr"


def image_exists(tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0


# --------------------------------------------------------------------------------------------
# Images


def ensure_python_image(workdir: Path) -> None:
    """The local stand-in for a Python base image, made once and kept by its tag."""
    if image_exists(PYTHON_IMAGE):
        return
    if PYTHON_IMAGE != "local/debian-py:bookworm":
        sh("docker", "pull", PYTHON_IMAGE)
        return
    if shutil.which("debootstrap") is None or os.geteuid() != 0:
        pytest.fail(f"{PYTHON_IMAGE} is missing and making it needs root and debootstrap "
                    "(apt-get install debootstrap), or set BAYESFL_DOCKER_PYTHON_IMAGE")
    rootfs = workdir / "rootfs"
    sh("debootstrap", "--variant=minbase",
       "--include=python3,python3-venv,python3-pip,ca-certificates", "bookworm", str(rootfs))
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    imported = subprocess.run(["docker", "import", "-", PYTHON_IMAGE], stdin=tar.stdout,
                              capture_output=True, text=True, timeout=SLOW)
    tar.wait()
    assert imported.returncode == 0, imported.stderr
    shutil.rmtree(rootfs, ignore_errors=True)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def serve(directory: Path) -> http.server.ThreadingHTTPServer:
    handler = functools.partial(QuietHandler, directory=str(directory))
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", EXTRAS_PORT), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def build_extras(extras: Path) -> dict[str, str]:
    """Build args that hand pip this machine's CA bundle and CPU torch wheel, if it has them."""
    args: dict[str, str] = {}
    bundle = next((Path(p) for p in CA_BUNDLES if p and Path(p).is_file()), None)
    if bundle is not None:
        shutil.copyfile(bundle, extras / "ca.crt")
        args["EXTRA_CA_URL"] = "ca.crt"
    torch_version = re.search(r"ARG TORCH_VERSION=(\S+)", (DOCKER_DIR / "Dockerfile").read_text())[1]
    got = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
         "-d", str(extras / "wheels"), f"torch=={torch_version}+cpu"],
        capture_output=True, text=True, timeout=SLOW,
    )
    if got.returncode == 0:
        # A local CPU wheel: use it and skip the CPU index (it may be unreachable from here).
        args["EXTRA_FIND_LINKS"] = "wheels/"
        args["TORCH_INDEX_URL"] = ""
    return args


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    """Builds the Flower stand-ins and the app image; returns the compose settings naming them."""
    requires_engine()
    work = tmp_path_factory.mktemp("images")
    ensure_python_image(work)
    extras = work / "extras"
    extras.mkdir()
    args = build_extras(extras)
    server = serve(extras)
    base_url = f"http://127.0.0.1:{server.server_address[1]}/"
    args = {k: (base_url + v if k.startswith("EXTRA_") else v) for k, v in args.items()}
    try:
        for component, tag in FLWR_IMAGES.items():
            sh("docker", "build", "--network", "host", "-f", str(DOCKER_DIR / "flwr.Dockerfile"),
               "--target", component, "-t", tag,
               "--build-arg", f"PYTHON_IMAGE={PYTHON_IMAGE}",
               "--build-arg", f"FLWR_VERSION={FLWR_VERSION}",
               "--build-arg", f"EXTRA_CA_URL={args.get('EXTRA_CA_URL', '')}",
               str(DOCKER_DIR))
        settings = {
            "SUPERLINK_IMAGE": FLWR_IMAGES["superlink"],
            "SUPERNODE_IMAGE": FLWR_IMAGES["supernode"],
            "SUPEREXEC_IMAGE": FLWR_IMAGES["superexec"],
            "APP_IMAGE": APP_IMAGE,
        }
        # The app image through the compose file's own build section.
        build_env = {**settings, **args, "BUILD_NETWORK": "host"}
        Compose("bayesflbuild", ["compose.yml"], build_env).run("build", "superexec-serverapp")
    finally:
        server.shutdown()
        server.server_close()
    return settings


# --------------------------------------------------------------------------------------------
# Compose projects and the flwr CLI


class Compose:
    """One compose project: its files (in docker/) and its settings."""

    def __init__(self, project: str, files: list[str | Path], settings: dict[str, str]) -> None:
        self.project, self.files = project, files
        self.env = {
            **{k: v for k, v in os.environ.items() if k not in COMPOSE_SETTINGS},
            "COMPOSE_HTTP_TIMEOUT": "900",
            "DOCKER_CLIENT_TIMEOUT": "900",
            **settings,
        }

    def run(self, *args: str, check: bool = True, timeout: float = SLOW):
        files = [a for f in self.files for a in ("-f", str(f))]
        return sh(*compose_cmd(), *files, "-p", self.project, *args,
                  cwd=DOCKER_DIR, env=self.env, check=check, timeout=timeout)

    def logs(self) -> str:
        done = self.run("logs", "--no-color", "--tail=150", check=False, timeout=120)
        return done.stdout[-20000:]

    def down(self) -> None:
        """Remove the project's containers, networks and volumes, also when `down` gives up early
        (vfs storage deletes big containers slowly, and volumes wait for their containers)."""
        self.run("down", "--volumes", "--remove-orphans", "--timeout", "5", check=False, timeout=900)
        label = f"label=com.docker.compose.project={self.project}"
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            left = sh("docker", "ps", "-aq", "--filter", label, check=False).stdout.split()
            if not left:
                break
            sh("docker", "rm", "-f", *left, check=False, timeout=900)
            time.sleep(5)
        for kind in ("volume", "network"):
            found = sh("docker", kind, "ls", "-q", "--filter", label, check=False).stdout.split()
            if found:
                sh("docker", kind, "rm", *found, check=False, timeout=300)


class Cli:
    """The host's `flwr` with a private FLWR_HOME holding one connection to the SuperLink."""

    def __init__(self, home: Path, port: int, ca_cert: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            '[superlink]\ndefault = "docker"\n\n[superlink.docker]\n'
            f'address = "127.0.0.1:{port}"\nroot-certificates = "{ca_cert}"\n'
        )
        self.env = {**os.environ, "FLWR_HOME": str(home)}

    def __call__(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([flwr_cli(), *args], cwd=APP_DIR, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def submit(self, run_config: str) -> int:
        started = self("run", ".", "docker", "--format", "json", "--run-config", run_config)
        assert started.returncode == 0, started.stdout + started.stderr
        return int(json.loads(started.stdout)["run-id"])

    def status(self, run_id: int) -> str | None:
        listed = self("ls", "docker", "--run-id", str(run_id), "--format", "json", timeout=60)
        if listed.returncode != 0:
            return None
        try:
            return json.loads(listed.stdout)["runs"][0]["status"]
        except (ValueError, KeyError, IndexError):
            return None

    def wait(self, run_id: int, timeout: float = RUN_TIMEOUT) -> str:
        deadline, status = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            status = self.status(run_id)
            if status and status.startswith("finished"):
                return status
            time.sleep(5)
        return f"still {status} after {timeout} s"

    def log(self, run_id: int) -> str:
        return self("log", str(run_id), "docker", "--show", timeout=60).stdout[-10000:]


def project_name(tag: str) -> str:
    return f"bayesfl{tag}{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def certs(images, tmp_path_factory) -> Path:
    """CA and SuperLink certificate, made by the compose certs service."""
    out = tmp_path_factory.mktemp("certs")
    certs = Compose(project_name("certs"), ["compose.certs.yml"], {**images, "CERTS_DIR": str(out)})
    try:
        certs.run("run", "--rm", "certs")
    finally:
        certs.down()
    assert {p.name for p in out.iterdir()} >= {"ca.crt", "ca.key", "server.pem", "server.key"}
    return out


def node_npz(folder: Path, partition_id: int, size: int) -> None:
    """A node's own data set: `size` samples of a digits partition, readable by the image's user."""
    from task.config import parse_run_config
    from task.data import partition

    data = partition(parse_run_config({}), partition_id, 2)
    folder.mkdir(parents=True)
    np.savez(folder / "train.npz", x=data.x[:size], y=data.y[:size])
    folder.chmod(0o755)
    (folder / "train.npz").chmod(0o644)


def host_user() -> str:
    return f"{os.getuid()}:{os.getgid()}"


def results_of(outputs: Path, name: str) -> dict:
    path = outputs / name / "results.json"
    assert path.is_file(), f"no {path}; outputs holds {sorted(p.name for p in outputs.rglob('*'))}"
    return json.loads(path.read_text())


# --------------------------------------------------------------------------------------------
# Tests


def test_image_requirements_match_pyproject():
    """docker/requirements.txt lists pyproject's dependencies, less flwr and torch."""
    project = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["project"]
    expected = {re.sub(r"\[.*?\]", "", d).replace(" ", "") for d in project["dependencies"]}
    expected = {d for d in expected if not re.match(r"(flwr|torch)\b(?!-)", d)}
    lines = (DOCKER_DIR / "requirements.txt").read_text().splitlines()
    listed = {ln.replace(" ", "") for ln in lines if ln.strip() and not ln.startswith("#")}
    assert listed == expected


@pytest.mark.docker
def test_compose_files_are_valid(tmp_path):
    """Every documented combination of compose files passes the compose tool's own check."""
    requires_engine()
    settings = {"SUPERLINK_ADDRESS": "superlink.example.org:8000",
                "NODE_CONFIG": "partition-id=0 num-partitions=2", "CERTS_DIR": str(tmp_path)}
    for files in (["compose.yml"], ["compose.yml", "compose.tls.yml"],
                  ["compose.yml", "compose.gpu.yml"],
                  ["compose.yml", "compose.tls.yml", "compose.gpu.yml"],
                  ["compose.server.yml"], ["compose.node.yml"],
                  ["compose.node.yml", "compose.node-gpu.yml"], ["compose.certs.yml"]):
        Compose("bayesflconfig", files, settings).run("config", "--quiet", timeout=120)


@pytest.mark.docker
def test_one_host_federation_with_tls(images, certs, tmp_path):
    """compose.yml + compose.tls.yml: a run from the host CLI completes on the nodes' own data."""
    outputs, port = tmp_path / "outputs", free_port()
    outputs.mkdir()
    node_npz(tmp_path / "node1", 0, 150)
    node_npz(tmp_path / "node2", 1, 200)
    stack = Compose(project_name("onehost"), ["compose.yml", "compose.tls.yml"], {
        **images,
        "CERTS_DIR": str(certs),
        "SUPERLINK_PUBLISH": f"127.0.0.1:{port}",
        "SERVERAPP_OUTPUTS": str(outputs),
        "SERVERAPP_USER": host_user(),  # results belong to whoever runs the test
        "SUPERNODE_1_CONFIG": "data-path='/app/data/train.npz'",
        "SUPERNODE_1_DATA": str(tmp_path / "node1"),
        "SUPERNODE_2_CONFIG": "data-path='/app/data/train.npz'",
        "SUPERNODE_2_DATA": str(tmp_path / "node2"),
    })
    cli = Cli(tmp_path / "flwr-home", port, certs / "ca.crt")
    try:
        stack.run("up", "--detach", "--no-build")
        run_id = cli.submit("num-server-rounds=2 local-epochs=1 output-dir='/app/outputs/onehost'")
        status = cli.wait(run_id)
        assert status == "finished:completed", f"{status}\n{cli.log(run_id)}\n{stack.logs()}"

        results = results_of(outputs, "onehost")
        assert [r["round"] for r in results["rounds"]] == [1, 2]
        # 80% of each node's own file trains, 20% validates: 120 + 160 and 30 + 40 samples.
        assert all(r["train_num_examples"] == 280 for r in results["rounds"]), results["rounds"]
        assert all(r["client_num_examples"] == 70 for r in results["rounds"]), results["rounds"]
        assert (outputs / "onehost" / "model.npz").is_file()

        # The ClientApps' user may write client state on its volume.
        stack.run("exec", "-T", "superexec-clientapp-1", "sh", "-c",
                  "test -w /app/state && test -r /app/data/train.npz", timeout=120)

        # The SuperLink's state is on a volume: the run is still known after a restart.
        stack.run("restart", "superlink", timeout=600)
        deadline = time.monotonic() + 300
        while (after := cli.status(run_id)) is None and time.monotonic() < deadline:
            time.sleep(3)
        assert after == "finished:completed", after
    finally:
        stack.down()


@pytest.mark.docker
def test_server_and_node_compose_files(images, certs, tmp_path):
    """compose.server.yml and two compose.node.yml projects (as on three hosts) finish a run."""
    outputs, port = tmp_path / "outputs", free_port()
    outputs.mkdir()
    server = Compose(project_name("server"), ["compose.server.yml"], {
        **images,
        "CERTS_DIR": str(certs),
        "SUPERLINK_PUBLISH": f"127.0.0.1:{port}",
        "SERVERAPP_OUTPUTS": str(outputs),
        "SERVERAPP_USER": host_user(),
    })
    # On one host the nodes reach the SuperLink over the server project's network instead of
    # a public address; `superlink` is a name in its certificate.
    joins = tmp_path / "join-server-network.yml"
    joins.write_text(
        "services:\n  supernode:\n    networks: [default, federation]\n"
        f"networks:\n  federation:\n    external: true\n    name: {server.project}_default\n"
    )
    nodes = [
        Compose(project_name(f"node{i}"), ["compose.node.yml", joins], {
            **images,
            "SUPERLINK_ADDRESS": "superlink:8000",
            "SUPERLINK_CA_CERT": str(certs / "ca.crt"),
            "NODE_CONFIG": f"partition-id={i} num-partitions=2",
        })
        for i in range(2)
    ]
    cli = Cli(tmp_path / "flwr-home", port, certs / "ca.crt")
    try:
        server.run("up", "--detach", "--no-build")
        for node in nodes:
            node.run("up", "--detach", "--no-build")
        run_id = cli.submit("num-server-rounds=1 local-epochs=1 output-dir='/app/outputs/split'")
        status = cli.wait(run_id)
        assert status == "finished:completed", (
            f"{status}\n{cli.log(run_id)}\n{server.logs()}\n" + "\n".join(n.logs() for n in nodes)
        )
        results = results_of(outputs, "split")
        assert [r["round"] for r in results["rounds"]] == [1]
        assert results["rounds"][0]["replies"] == 2
    finally:
        for node in nodes:
            node.down()
        server.down()
