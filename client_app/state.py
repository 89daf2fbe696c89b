"""Client state that must outlive a round (and, in deployment, a SuperNode restart).

Flower keeps `context.state` only in the SuperNode's memory. When the node config names a
`state-dir`, every save is also written to `<state-dir>/run-<run_id>.npz` atomically, and a node
whose memory is empty (it restarted) reloads from there. The server's end-of-run message
removes the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context

from task.files import save_npz

STATE_ARRAYS = "client-state"
STATE_META = "client-state-meta"
STATE_DIR_KEY = "state-dir"


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
            memory = {k: v.numpy() for k, v in self.context.state.array_records[STATE_ARRAYS].items()}
            memory_round = int(self.context.state.config_records[STATE_META]["round"])
        if self.path is not None and self.path.exists():
            with np.load(self.path, allow_pickle=False) as npz:
                disk_round = int(npz["__round__"])
                if disk_round > memory_round:
                    return {k: npz[k] for k in npz.files if k != "__round__"}
        return memory

    def save(self, arrays: dict[str, np.ndarray], server_round: int) -> None:
        """Replace the state; called only at the end of a successful handler."""
        if self.path is not None:
            save_npz(self.path, {"__round__": np.int64(server_round), **arrays})
        # Memory last: a failed disk write leaves both copies as they were.
        self.context.state[STATE_ARRAYS] = ArrayRecord(
            {k: Array(np.asarray(v)) for k, v in arrays.items()}
        )
        self.context.state[STATE_META] = ConfigRecord({"round": server_round})

    def clear(self) -> None:
        for name in (STATE_ARRAYS, STATE_META):
            if name in self.context.state:
                del self.context.state[name]
        if self.path is not None:
            self.path.unlink(missing_ok=True)
