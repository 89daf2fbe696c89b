"""Client state that must outlive a round, a SuperNode restart and a resumed run.

Flower keeps `context.state` only in the SuperNode's memory, and a resumed run is a new Flower
run whose nodes start with empty memory. So every save is also written atomically to a file
`run-<key>-<identity>.npz` in the node's state folder (`state_folder`), where `key` is the
server's state key (which a resumed run keeps) and `identity` is the node's (`node_identity`:
`partition-<id>` for a simulated node, `node-<Flower node id>` otherwise), so that nodes sharing
one folder never read each other's duals. The state folder is

- `<state-dir>/` when the node config names a `state-dir` (deployment: the operator's folder on
  the node's own machine);
- `<client-state-dir>/partition-<partition-id>/` for a simulated node (node config with
  `partition-id` and `num-partitions`, no `data-path`, no `state-dir`), where `client-state-dir`
  is the folder the server sends (`<output-dir>/client-state`). The node uses it only if it is
  an absolute path without `..`, named `client-state`, that already exists on the node's machine:
  the server creates it, so a node on another machine never writes into a server path;
- nowhere otherwise (memory only).

What the server sends cannot reach outside that folder: the key must be 1-64 letters, digits,
`-` or `_` (`STATE_KEY_PATTERN`), and the file (and its lock) must resolve, symbolic links
followed, to itself inside the resolved state-dir or client-state folder (a link is never
followed), else the node answers with an error reply and touches nothing. While a handler uses
the file it holds an exclusive advisory lock on `<file>.lock` beside it (`fcntl.flock`,
non-blocking; the lock file names its holder and is removed on release): a second node that
finds the file in use answers with an error reply naming the holder instead of interleaving
writes. The lock lasts one message, not the node process:
Flower runs a node's messages in different processes (a new ClientApp process per message in
deployment, any of the Ray actors in simulation), so a lock held for a process's life would lock
a node out of its own file.

A node whose memory is empty (it restarted, or the run was resumed) reloads from the file and
logs one line naming the file, the round it was saved in and a SHA-256 digest of the arrays
(`state_digest`), so an operator or a test can tell exactly what was restored. The server's
end-of-run message removes the file.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import socket
import time
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
LOCK_SUFFIX = ".lock"


class ClientStateError(RuntimeError):
    """The node cannot take part in the run as asked; its reply is an error with this message."""


def is_simulated(node_config: Mapping) -> bool:
    """A simulation node (Flower gives it partition-id and num-partitions), not an operator's."""
    return all(k in node_config for k in SIMULATED_NODE_KEYS) and not (
        "data-path" in node_config or STATE_DIR_KEY in node_config
    )


def _partition(node_config: Mapping) -> int:
    partition = node_config["partition-id"]
    if isinstance(partition, bool) or not (str(partition).isascii() and str(partition).isdecimal()):
        raise ClientStateError(f"node config: partition-id {partition!r} is not an integer >= 0")
    return int(partition)


def node_identity(node_config: Mapping, node_id: int) -> str:
    """Who this node is across Flower runs and restarts: `partition-<id>` for a simulated node
    (a resumed simulation gives every node a new node id, not a new partition), else
    `node-<node id>`. Flower ties the node id of an authenticated SuperNode to its public key, so
    it survives restarts; an unauthenticated SuperNode makes a new key, hence a new node id, at
    every start, and the server then takes it for a new node too (its duals start from zero on
    both sides)."""
    if is_simulated(node_config):
        return f"partition-{_partition(node_config)}"
    return f"node-{int(node_id)}"


def state_root(node_config: Mapping, client_state_dir: str | None) -> Path | None:
    """The folder no state file of this node may leave: its state-dir, or the server's
    client-state folder for a simulated node (module docstring); None: memory only.

    `client_state_dir` is what the server sent; a malformed one is refused, not used.
    """
    if STATE_DIR_KEY in node_config:
        return Path(str(node_config[STATE_DIR_KEY]))
    if not client_state_dir or not is_simulated(node_config):
        return None
    root = Path(str(client_state_dir))
    if not root.is_absolute() or ".." in root.parts or root.name != CLIENT_STATE_FOLDER:
        raise ClientStateError(
            f"the server's client-state-dir {_shown(client_state_dir)} is not an absolute path "
            f"named '{CLIENT_STATE_FOLDER}' without '..'"
        )
    if not root.is_dir():  # not the server's machine: nothing to share, keep state in memory
        return None
    return root


def state_folder(node_config: Mapping, client_state_dir: str | None) -> Path | None:
    """The folder this node files its lasting state in (module docstring), or None: memory only."""
    return _folder(node_config, state_root(node_config, client_state_dir))


def _folder(node_config: Mapping, root: Path | None) -> Path | None:
    if root is None or STATE_DIR_KEY in node_config:
        return root
    return root / f"partition-{_partition(node_config)}"


def state_path(
    key: str,
    node_config: Mapping,
    node_id: int,
    client_state_dir: str | None,
    prefix: str = "run",
) -> Path | None:
    """The node's state file `<prefix>-<key>-<identity>.npz` for the run with state key `key`,
    checked to stay inside its root."""
    if not STATE_KEY_PATTERN.fullmatch(key):
        raise ClientStateError(
            f"the server's state-key {_shown(key)} is not 1-64 letters, digits, '-' or '_'"
        )
    root = state_root(node_config, client_state_dir)
    folder = _folder(node_config, root)
    if folder is None:
        return None
    path = folder / f"{prefix}-{key}-{node_identity(node_config, node_id)}.npz"
    for candidate in (path, lock_path(path)):
        # Not a link, not in a linked-away folder: another node's file is never this node's.
        resolved = candidate.resolve()
        inside = resolved.is_relative_to(root.resolve())
        if resolved != folder.resolve() / candidate.name or not inside:
            raise ClientStateError(
                f"state file {candidate} resolves to {resolved}, not to itself inside the node's "
                f"state folder {root.resolve()} (a symbolic link?); the node does not follow it"
            )
    return path


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + LOCK_SUFFIX)


def _shown(value: object, limit: int = 80) -> str:
    """repr of a value from the server, cut short: an error line stays one short line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(str(value))} characters)"


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


class StateLock:
    """An exclusive advisory lock on `<state file>.lock`, taken without waiting.

    The lock file holds a line naming its holder and is removed on release. An acquirer checks,
    once it holds the lock, that the path still names the file it locked (the holder it waited
    on may have removed it), and otherwise tries again on the new file.
    """

    def __init__(self, path: Path, holder: str) -> None:
        self.path, self.holder = path, holder
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    raise
                raise ClientStateError(
                    f"state file {self.path.with_suffix('')} is in use by another node "
                    f"({self._other_holder()}); two nodes must not share one state file: give "
                    "each node its own state-dir"
                ) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, self.holder.encode())
                self.fd = fd
                return
            os.close(fd)  # removed (and maybe re-created) by the holder we raced with
        raise ClientStateError(f"could not lock {self.path}: it keeps being replaced")

    def _other_holder(self) -> str:
        try:
            return self.path.read_text(errors="replace").strip()[:200] or "holder unknown"
        except OSError:
            return "holder unknown"

    def release(self) -> None:
        if self.fd is None:
            return
        # Remove while still holding it: a waiter then finds a new file, never a stale lock.
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


class ClientState:
    """Named flat arrays plus the round they were saved in, for one node and one run.

    Use it as a context manager to hold the file's lock for a whole message; outside one, each
    disk access takes the lock for its own duration. A subclass keeps other arrays of the node
    in a file and memory records of its own (`FILE_PREFIX`, `ARRAYS_RECORD`, `META_RECORD`).
    """

    FILE_PREFIX, ARRAYS_RECORD, META_RECORD = "run", STATE_ARRAYS, STATE_META

    def __init__(
        self, context: Context, key: str | None = None, client_state_dir: str | None = None
    ) -> None:
        """`key` names the run's state on disk (the server's state key, which survives a resume
        of the run under a new Flower run id); the Flower run id when there is none.
        `client_state_dir` is the folder the server offers simulated nodes (`state_folder`)."""
        self.context = context
        key = str(context.run_id) if key is None else str(key)
        self.key = key
        self.path = state_path(
            key, context.node_config, context.node_id, client_state_dir, self.FILE_PREFIX
        )
        self._lock: StateLock | None = None
        self._depth = 0

    @property
    def client_id(self) -> str:
        """Who this node is across Flower runs (`node_identity`)."""
        return node_identity(self.context.node_config, self.context.node_id)

    def __enter__(self) -> ClientState:
        if self.path is not None and self._depth == 0:
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            holder = (
                f"{self.client_id} of Flower run {self.context.run_id}, pid {os.getpid()} on "
                f"{socket.gethostname()}, since {since}"
            )
            lock = StateLock(lock_path(self.path), holder)
            lock.acquire()
            self._lock = lock
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0 and self._lock is not None:
            self._lock.release()
            self._lock = None

    def where(self) -> str:
        """Where the state lives beyond memory, for messages."""
        if self.path is None:
            return "node memory only (no state-dir)"
        legacy = self.path.with_name(f"run-{self.key}.npz")
        if not self.path.exists() and legacy.exists():
            return (
                f"file {self.path}; {legacy.name} there is from a version without node "
                "identities in file names, rename it if it is this node's"
            )
        return f"file {self.path}"

    def load(self) -> dict[str, np.ndarray]:
        """The newest saved arrays: memory, or the disk copy when memory is empty or older."""
        memory_round, memory = -1, {}
        if self.ARRAYS_RECORD in self.context.state.array_records:
            memory = record_to_numpy(self.context.state.array_records[self.ARRAYS_RECORD])
            memory_round = int(self.context.state.config_records[self.META_RECORD]["round"])
        if self.path is None:
            return memory
        with self:
            if not self.path.exists():
                return memory
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
            with self:
                save_npz(self.path, {ROUND_KEY: np.int64(server_round), **arrays})
        # Memory last: a failed disk write leaves both copies as they were.
        self.context.state[self.ARRAYS_RECORD] = numpy_to_record(arrays)
        self.context.state[self.META_RECORD] = ConfigRecord({"round": server_round})

    def clear(self) -> None:
        for name in (self.ARRAYS_RECORD, self.META_RECORD):
            if name in self.context.state:
                del self.context.state[name]
        if self.path is not None:
            with self:
                self.path.unlink(missing_ok=True)
