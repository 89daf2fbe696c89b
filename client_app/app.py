"""The ClientApp: one train handler that runs the configured method's client step, and an
evaluate handler that scores the global model on the node's validation split."""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.local import ClientRound, device_for, node_data, node_seed
from client_app.state import ClientState
from task import records
from task.config import parse_run_config
from task.data import ArrayData
from task.methods import METHODS, resolve
from task.metrics import classification_metrics, predict_probs

# The client half of each method, by config name, as `task.methods` registers it.
CLIENT_STEPS: dict[str, Callable[[ClientRound], RecordDict]] = {
    name: resolve(m.client) for name, m in METHODS.items()
}

app = ClientApp()


def _round(msg: Message, context: Context) -> tuple[ClientRound, ArrayData]:
    cfg = parse_run_config(context.run_config)
    train, val, spec = node_data(cfg, tuple(sorted(context.node_config.items())))
    config = msg.content.config_records[records.CONFIG]
    server_round = int(config[records.SERVER_ROUND])
    round_ = ClientRound(
        cfg=cfg,
        content=msg.content,
        state=ClientState(context, _state_key(msg)),
        train=train,
        spec=spec,
        device=device_for(cfg),
        seed=node_seed(cfg, context.node_config, context.node_id, server_round),
    )
    return round_, val


def _state_key(msg: Message) -> str | None:
    config = msg.content.config_records.get(records.CONFIG)
    return None if config is None else config.get(records.STATE_KEY)


@app.train()
def train(msg: Message, context: Context) -> Message:
    round_, _ = _round(msg, context)
    return Message(CLIENT_STEPS[round_.cfg.strategy](round_), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    round_, val = _round(msg, context)
    data = val if len(val) else round_.train
    probs = predict_probs(round_.model_at(), data.x, round_.device)
    metrics = dict(classification_metrics(probs, data.y))
    metrics[records.NUM_EXAMPLES] = len(data)
    return Message(RecordDict({records.METRICS: MetricRecord(metrics)}), reply_to=msg)


@app.query(records.FINISH_ACTION)
def finish(msg: Message, context: Context) -> Message:
    """The run is over: drop this node's saved state for it."""
    ClientState(context, _state_key(msg)).clear()
    return Message(RecordDict(), reply_to=msg)
