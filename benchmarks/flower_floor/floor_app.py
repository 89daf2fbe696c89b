"""A ServerApp and ClientApp that do nothing but exchange messages, to time Flower alone.

Per round: one TRAIN message to every connected node with `num-params` float32 values (the
model), and one EVALUATE message with them again; the ClientApp echoes the arrays, or returns one
metric. `output` receives {"rounds": [{"round": r, "seconds": s}, ...]} as JSON.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    rounds = int(context.run_config["num-server-rounds"])
    arrays = ArrayRecord({"weights": Array(np.zeros(int(context.run_config["num-params"]), np.float32))})
    while not (nodes := list(grid.get_node_ids())):
        time.sleep(0.5)
    results = []
    for server_round in range(1, rounds + 1):
        started = time.perf_counter()
        for message_type in (MessageType.TRAIN, MessageType.EVALUATE):
            messages = [
                Message(RecordDict({"arrays": arrays}), dst_node_id=node,
                        message_type=message_type, group_id=str(server_round))
                for node in nodes
            ]
            replies = list(grid.send_and_receive(messages, timeout=600))
            if len(replies) != len(nodes) or any(r.has_error() for r in replies):
                raise RuntimeError(f"round {server_round}: {len(replies)} replies for {len(nodes)} nodes")
        results.append({"round": server_round, "seconds": time.perf_counter() - started})
    Path(str(context.run_config["output"])).write_text(json.dumps({"rounds": results}))


@client.train()
def train(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"arrays": msg.content.array_records["arrays"]}), reply_to=msg)


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)
