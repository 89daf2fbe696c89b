"""FedAvg client: train from the global weights, send the local weights and the example count."""

from __future__ import annotations

from flwr.app import MetricRecord, RecordDict

from client_app.compression import encode_reply
from client_app.local import ClientRound
from client_app.optimizers import build_optimizer
from client_app.training import train_epochs
from task import records
from task.params import flatten


def train(round_: ClientRound) -> RecordDict:
    model, cfg = round_.model_at(), round_.cfg
    optimizer = build_optimizer(cfg, model.parameters(), cfg.local_lr, len(round_.train))
    loss = train_epochs(
        model, round_.train, optimizer, cfg.local_epochs, cfg.batch_size,
        round_.device, round_.seed,
    )
    weights = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    sent, _ = encode_reply(round_, {records.ARRAYS: flatten(weights)}, weights)
    return RecordDict(
        {
            records.ARRAYS: sent[records.ARRAYS],
            records.METRICS: MetricRecord(
                {records.NUM_EXAMPLES: len(round_.train), "loss": loss}
            ),
        }
    )
