"""Client state that must outlive a round, a SuperNode restart and a resumed run.

Flower keeps `context.state` only in the SuperNode's memory, and a resumed run is a new Flower
run whose nodes start with empty memory. So every save is also written atomically to a file
named by the server's state key (which a resumed run keeps), `run-<key>.npz`, in the node's
state folder (`state_folder`):

- `<state-dir>/` when the node config names a `state-dir` (deployment: the operator's folder on
  the node's own machine);
- `<client-state-dir>/partition-<partition-id>/` for a simulated node (node config with
  `partition-id` and `num-partitions`, no `data-path`, no `state-dir`), where `client-state-dir`
  is the folder the server sends (`<output-dir>/client-state`). The node uses it only if it is
  an absolute path without `..`, named `client-state`, that already exists on the node's machine:
  the server creates it, so a node on another machine never writes into a server path;
- nowhere otherwise (memory only).

A node whose memory is empty (it restarted, or the run was resumed) reloads from the file and
logs one line naming the file, the round it was saved in and a SHA-256 digest of the arrays
(`state_digest`), so an operator or a test can tell exactly what was restored. The server's
end-of-run message removes the file.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from logging import INFO
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context
from flwr.common.logger import log

from task.records import CLIENT_STATE_FOLDER
from task.files import save_npz
from task.params import numpy_to_record, record_to_numpy

STATE_ARRAYS = "client-state"
STATE_META = "client-state-meta"
STATE_DIR_KEY = "state-dir"
ROUND_KEY = "__round__"  # in the .npz beside the arrays: the round they were saved in
SIMULATED_NODE_KEYS = ("partition-id", "num-partitions")
STATE_KEY_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")


class ClientStateError(RuntimeError):
    """The node cannot take part in the run as asked; its reply is an error with this message."""


def is_simulated(node_config: Mapping) -> bool:
    """A simulation node (Flower gives it partition-id and num-partitions), not an operator's."""
    return all(k in node_config for k in SIMULATED_NODE_KEYS) and not (
        "data-path" in node_config or STATE_DIR_KEY in node_config
    )


def state_folder(node_config: Mapping, client_state_dir: str | None) -> Path | None:
    """The folder this node files its lasting state in (module docstring), or None: memory only.

    `client_state_dir` is what the server sent; a malformed one is refused, not used.
    """
    if STATE_DIR_KEY in node_config:
        return Path(str(node_config[STATE_DIR_KEY]))
    if not client_state_dir or not is_simulated(node_config):
        return None
    root = Path(str(client_state_dir))
    if not root.is_absolute() or ".." in root.parts or root.name != CLIENT_STATE_FOLDER:
        raise ClientStateError(
            f"the server's client-state-dir {str(client_state_dir)!r} is not an absolute path "
            f"named '{CLIENT_STATE_FOLDER}' without '..'"
        )
    if not root.is_dir():  # not the server's machine: nothing to share, keep state in memory
        return None
    partition = node_config["partition-id"]
    if isinstance(partition, bool) or not (str(partition).isascii() and str(partition).isdecimal()):
        raise ClientStateError(f"node config: partition-id {partition!r} is not an integer >= 0")
    return root / f"partition-{int(partition)}"


def state_digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over the arrays in key order: each key, dtype, shape and C-order bytes."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        array = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def read_state_file(path: Path) -> tuple[int, dict[str, np.ndarray]]:
    """(round, arrays) of a file written by `ClientState.save`."""
    with np.load(path, allow_pickle=False) as npz:
        return int(npz[ROUND_KEY]), {k: npz[k] for k in npz.files if k != ROUND_KEY}


class ClientState:
    """Named flat arrays plus the round they were saved in, for one node and one run."""

    def __init__(
        self, context: Context, key: str | None = None, client_state_dir: str | None = None
    ) -> None:
        """`key` names the run's state on disk (the server's state key, which survives a resume
        of the run under a new Flower run id); the Flower run id when there is none.
        `client_state_dir` is the folder the server offers simulated nodes (`state_folder`)."""
        self.context = context
        key = str(context.run_id) if key is None else str(key)
        if not STATE_KEY_PATTERN.fullmatch(key):
            raise ClientStateError(
                f"the server's state-key {key!r} is not 1-64 letters, digits, '-' or '_'"
            )
        folder = state_folder(context.node_config, client_state_dir)
        self.path = folder / f"run-{key}.npz" if folder is not None else None

    @property
    def client_id(self) -> str:
        """Who this node is across Flower runs: its partition in simulation (a resumed
        simulation gives every node a new node id), else its node id."""
        if is_simulated(self.context.node_config):
            return f"partition-{self.context.node_config['partition-id']}"
        return f"node-{self.context.node_id}"

    def where(self) -> str:
        """Where the state lives beyond memory, for messages."""
        return f"file {self.path}" if self.path is not None else "node memory only (no state-dir)"

    def load(self) -> dict[str, np.ndarray]:
        """The newest saved arrays: memory, or the disk copy when memory is empty or older."""
        memory_round, memory = -1, {}
        if STATE_ARRAYS in self.context.state.array_records:
            memory = record_to_numpy(self.context.state.array_records[STATE_ARRAYS])
            memory_round = int(self.context.state.config_records[STATE_META]["round"])
        if self.path is not None and self.path.exists():
            disk_round, arrays = read_state_file(self.path)
            if disk_round > memory_round:
                log(
                    INFO,
                    "Restored client state of run %s from %s (round %d, sha256 %s)",
                    self.context.run_id, self.path, disk_round, state_digest(arrays),
                )
                return arrays
        return memory

    def save(self, arrays: dict[str, np.ndarray], server_round: int) -> None:
        """Replace the state; called only at the end of a successful handler."""
        if self.path is not None:
            save_npz(self.path, {ROUND_KEY: np.int64(server_round), **arrays})
        # Memory last: a failed disk write leaves both copies as they were.
        self.context.state[STATE_ARRAYS] = numpy_to_record(arrays)
        self.context.state[STATE_META] = ConfigRecord({"round": server_round})

    def clear(self) -> None:
        for name in (STATE_ARRAYS, STATE_META):
            if name in self.context.state:
                del self.context.state[name]
        if self.path is not None:
            self.path.unlink(missing_ok=True)
