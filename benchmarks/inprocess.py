"""A federation in one process: the real ServerApp loop, strategies and ClientApp handlers,
with messages handed over by function call instead of a SuperLink.

Benchmarks use it to run many seeds and settings quickly; what it leaves out (transport,
process start-up, Ray) is measured separately by `benchmarks/system` through real runs.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

from client_app.app import app as client_app
from server_app.app import run
from server_app.outputs import RunOutputs
from task.config import parse_run_config

ROOT = Path(__file__).resolve().parents[1]


def default_run_config() -> dict[str, Any]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return dict(pyproject["tool"]["flwr"]["app"]["config"])


def _set_task_identity() -> None:
    try:
        from flwr.supercore.task_identity import TaskIdentity
    except ImportError:  # older flwr releases need no task identity
        return
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


class NodeListGrid(Grid):
    """A Grid that knows its node ids and nothing else: all a strategy needs to configure a
    round. Tests and benchmarks hand its messages to clients themselves."""

    def __init__(self, node_ids: Iterable[int]) -> None:
        self.node_ids = list(node_ids)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        raise NotImplementedError

    def set_run(self, run):
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError


class InProcessGrid(NodeListGrid):
    """Nodes 1..N, each with its own Context (and so its own lasting state)."""

    def __init__(self, run_config: dict[str, Any], num_nodes: int) -> None:
        super().__init__(range(1, num_nodes + 1))
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": node - 1, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=run_config,
            )
            for node in self.node_ids
        }

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        return [self._deliver(m) for m in messages]

    def _deliver(self, message: Message) -> Message:
        try:
            return client_app(message, self.contexts[message.metadata.dst_node_id])
        except Exception as err:  # a failing client becomes an error reply, as in Flower
            return Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=message)


def simulate(
    overrides: dict[str, Any],
    num_nodes: int,
    make_grid: Callable[[dict[str, Any], int], InProcessGrid] = InProcessGrid,
) -> RunOutputs:
    """Run one federation in this process; returns its outputs (results, folder).
    `make_grid(run_config, num_nodes)` builds the grid (a subclass may alter replies)."""
    _set_task_identity()
    run_config = {**default_run_config(), **overrides}
    cfg = parse_run_config(run_config)
    return run(make_grid(run_config, num_nodes), cfg)
