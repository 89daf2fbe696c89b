"""Client state that must outlive a round (and, in deployment, a SuperNode restart).

Flower keeps `context.state` only in the SuperNode's memory. When the node config names a
`state-dir`, every save is also written to `<state-dir>/run-<key>.npz` atomically (the key is
the server's state key, which a resumed run keeps), and a node
whose memory is empty (it restarted) reloads from there, and logs one line naming the file,
the round it was saved in and a SHA-256 digest of the arrays (`state_digest`), so an operator
or a test can tell exactly what was restored. The server's end-of-run message removes the file.
"""

from __future__ import annotations

import hashlib
from logging import INFO
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context
from flwr.common.logger import log

from task.files import save_npz
from task.params import numpy_to_record, record_to_numpy

STATE_ARRAYS = "client-state"
STATE_META = "client-state-meta"
STATE_DIR_KEY = "state-dir"
ROUND_KEY = "__round__"  # in the .npz beside the arrays: the round they were saved in


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

    def __init__(self, context: Context, key: str | None = None) -> None:
        """`key` names the run's state on disk (the server's state key, which survives a resume
        of the run under a new Flower run id); the Flower run id when there is none."""
        self.context = context
        state_dir = context.node_config.get(STATE_DIR_KEY)
        name = f"run-{key or context.run_id}.npz"
        self.path = Path(str(state_dir)) / name if state_dir else None

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
