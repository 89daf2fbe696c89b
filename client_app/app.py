"""The ClientApp: one train handler that runs the configured method's client step, and an
evaluate handler that scores the global model on the node's held-out split
(`client-test-fraction`; a node with none replies `num-examples` 0 and no metrics), and its
personal model too when `personalize` asks for one (client_app/personal.py)."""

from __future__ import annotations

from collections.abc import Callable
from logging import ERROR

from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.logger import log

from client_app import personal
from client_app.compression import UndecodablePayload
from client_app.local import ClientRound, device_for, node_data, node_seed
from client_app.state import ClientState, ClientStateError
from task import records
from task.config import parse_run_config
from task.data import ArrayData
from task.methods import METHODS, resolve
from task.metrics import classification_metrics, nll_by_temperature, predict_probs

# The client half of each method, by config name, as `task.methods` registers it.
CLIENT_STEPS: dict[str, Callable[[ClientRound], RecordDict]] = {
    name: resolve(m.client) for name, m in METHODS.items()
}

app = ClientApp()


def _round(
    msg: Message, context: Context, state: ClientState | None = None
) -> tuple[ClientRound, ArrayData]:
    cfg = parse_run_config(context.run_config)
    train, val, spec = node_data(cfg, tuple(sorted(context.node_config.items())))
    train, _ = personal.lambda_split(cfg, train)
    config = msg.content.config_records[records.CONFIG]
    server_round = int(config[records.SERVER_ROUND])
    round_ = ClientRound(
        cfg=cfg,
        content=msg.content,
        state=state if state is not None else _state(msg, context),
        train=train,
        spec=spec,
        device=device_for(cfg),
        seed=node_seed(cfg, context.node_config, context.node_id, server_round),
    )
    return round_, val


def _state(msg: Message, context: Context) -> ClientState:
    """The node's state for the message's run; a handler holds it (`with`) for the whole
    message, so no other node uses the same file meanwhile."""
    config = msg.content.config_records.get(records.CONFIG) or {}
    return ClientState(context, config.get(records.STATE_KEY), config.get(records.CLIENT_STATE_DIR))


def _refusal(msg: Message, err: ClientStateError | UndecodablePayload) -> Message:
    """An error reply naming why this node cannot go on (the server logs it, counts it failed)."""
    log(ERROR, "Node refuses the message: %s", err)
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(err)), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    try:
        with _state(msg, context) as state:
            round_, _ = _round(msg, context, state)
            reply = CLIENT_STEPS[round_.cfg.strategy](round_)
            if round_.codec_state:  # kept beside what the method saved (if anything)
                state.save(state.load() | round_.codec_state, round_.server_round)
            personal.after_train(round_, reply, msg, context)
            return Message(reply, reply_to=msg)
    except (ClientStateError, UndecodablePayload) as err:
        return _refusal(msg, err)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    try:
        round_, val = _round(msg, context)  # evaluating reads no state: no lock
        model = round_.model_at() if len(val) else None  # decodes a compressed global
    except (ClientStateError, UndecodablePayload) as err:
        return _refusal(msg, err)
    metrics = {records.NUM_EXAMPLES: 0}  # nothing held out (client-test-fraction 0, tiny node)
    if model is not None:
        probs = predict_probs(model, val.x, round_.device)
        metrics = dict(classification_metrics(probs, val.y)) | {records.NUM_EXAMPLES: len(val)}
        if round_.cfg.predictive_temperature == "auto":  # the server fits it from these
            metrics |= nll_by_temperature(probs, val.y)
        if personal.evaluates(round_.cfg, round_.server_round):
            try:
                metrics |= personal.evaluate(round_, val, msg, context)
            except ClientStateError as err:
                return _refusal(msg, err)
    return Message(RecordDict({records.METRICS: MetricRecord(metrics)}), reply_to=msg)


@app.query(records.FINISH_ACTION)
def finish(msg: Message, context: Context) -> Message:
    """The run is over: drop this node's saved state for it."""
    try:
        with _state(msg, context) as state:
            state.clear()
    except ClientStateError as err:
        return _refusal(msg, err)
    return Message(RecordDict(), reply_to=msg)
