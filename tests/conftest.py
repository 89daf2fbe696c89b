"""Shared fixtures: a Grid without a runtime, and message helpers for strategy tests."""

from __future__ import annotations

import pytest
from flwr.app import Message, RecordDict

from benchmarks.inprocess import NodeListGrid


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


FakeGrid = NodeListGrid


@pytest.fixture
def fake_grid():
    return FakeGrid


def reply(instruction: Message, content: RecordDict) -> Message:
    return Message(content, reply_to=instruction)
