"""Shared fixtures: a Grid without a runtime, and message helpers for strategy tests."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid


@pytest.fixture(autouse=True, scope="session")
def _task_identity():
    """Messages read the current task's identity, which only a Flower runtime sets."""
    try:
        from flwr.supercore.task_identity import TaskIdentity
    except ImportError:  # releases before TaskIdentity existed need nothing
        yield
        return
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


class FakeGrid(Grid):
    """A Grid whose nodes are a fixed list; only node discovery is used by strategies."""

    def __init__(self, node_ids: Iterable[int]) -> None:
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return list(self.node_ids)

    def set_run(self, run):  # pragma: no cover - not used
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover - not used
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # pragma: no cover - not used
        raise NotImplementedError

    def push_messages(self, messages):  # pragma: no cover - not used
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover - not used
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover - not used
        raise NotImplementedError


@pytest.fixture
def fake_grid():
    return FakeGrid


def reply(instruction: Message, content: RecordDict) -> Message:
    return Message(content, reply_to=instruction)
