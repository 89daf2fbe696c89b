"""The test harness's LocalFederation finds and stops the SuperLink `flwr run` leaves behind."""

from __future__ import annotations

import subprocess
import sys

from tests.flower_runs import LocalFederation


def test_stop_kills_a_superlink_whose_command_line_is_longer_than_the_terminal(tmp_path, monkeypatch):
    home = tmp_path / "flwr-home"
    # Like Flower's: the FLWR_HOME path far into a long command line.
    args = ["flower-superlink", *["--padding"] * 30, f"{home}/local-superlink/state.db"]
    process = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", *args], start_new_session=True
    )
    monkeypatch.setenv("COLUMNS", "80")  # as a terminal may set it; ps honours it
    federation = LocalFederation(home)
    try:
        assert federation.superlink_pids() == [process.pid]
        federation.stop(grace=5)
        assert process.wait(timeout=5) != 0
        assert federation.superlink_pids() == []
    finally:
        process.kill()
