"""Run this app with the real `flwr` CLI and a managed local SuperLink, isolated per test."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

APP_DIR = Path(__file__).resolve().parents[1]
# The `flwr` CLI and the Flower executables it starts live beside this interpreter.
BIN_DIR = Path(sys.executable).parent


def run_config_string(settings: Mapping[str, Any]) -> str:
    """`settings` as flwr's --run-config takes them: key=value pairs, strings quoted."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return f"'{v}'" if isinstance(v, str) else repr(v)

    return " ".join(f"{k}={value(v)}" for k, v in settings.items())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class FlowerRun:
    run_id: int
    status: str
    logs: str


class LocalFederation:
    """A private FLWR_HOME and local SuperLink ports, so tests never share state or ports."""

    def __init__(self, home: Path, app_dir: Path = APP_DIR) -> None:
        self.home = home
        self.app_dir = app_dir
        self.env = {
            **os.environ,
            "PATH": f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(home),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
            "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        }

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["flwr", *args], cwd=self.app_dir, env=self.env, capture_output=True, text=True,
            timeout=timeout,
        )

    def run(self, run_config: str, num_supernodes: int, timeout: float = 600) -> FlowerRun:
        started = self.flwr(
            "run", ".", "--format", "json", "--run-config", run_config,
            "--federation-config", f"num-supernodes={num_supernodes}",
        )
        assert started.returncode == 0, started.stdout + started.stderr
        run_id = int(json.loads(started.stdout)["run-id"])
        deadline = time.monotonic() + timeout
        status = "unknown"
        while time.monotonic() < deadline:
            listed = self.flwr("ls", "--run-id", str(run_id), "--format", "json")
            if listed.returncode == 0:
                status = json.loads(listed.stdout)["runs"][0]["status"]
                if status.startswith("finished"):
                    break
            time.sleep(2)
        logs = self.flwr("log", str(run_id), "--show").stdout
        return FlowerRun(run_id, status, logs)

    def stop(self, grace: float = 10.0) -> None:
        """Kill the background SuperLink (and its children) that `flwr run` started for us:
        SIGTERM to its process group, SIGKILL to what is left after `grace` seconds."""
        pids = self.superlink_pids()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.killpg(os.getpgid(pid), sig)
                except ProcessLookupError:
                    pass
                except PermissionError:
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while pids and time.monotonic() < deadline:
                time.sleep(0.1)
                pids = self.superlink_pids()  # a killed one is gone, or a nameless zombie
            if not pids:
                return
        raise RuntimeError(f"SuperLink processes {pids} of {self.home} survived SIGKILL")

    def superlink_pids(self) -> list[int]:
        # -ww: whole command lines; ps otherwise cuts them at $COLUMNS, and the home is far in
        out = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout
        pids = []
        for line in out.splitlines():
            pid, _, args = line.strip().partition(" ")
            if str(self.home) in args and "flower-superlink" in args:
                pids.append(int(pid))
        return pids

