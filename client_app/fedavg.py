"""FedAvg client: train from the global weights, send the local weights and the example count."""

from __future__ import annotations

from flwr.app import MetricRecord, RecordDict

from client_app.local import ClientRound
from client_app.optimizers import build_optimizer
from client_app.training import train_epochs
from task import records
from task.params import model_to_record


def train(round_: ClientRound) -> RecordDict:
    model, cfg = round_.model_at(), round_.cfg
    optimizer = build_optimizer(cfg, model.parameters(), cfg.local_lr, len(round_.train))
    loss = train_epochs(
        model, round_.train, optimizer, cfg.local_epochs, cfg.batch_size,
        round_.device, round_.seed,
    )
    return RecordDict(
        {
            records.ARRAYS: model_to_record(model),
            records.METRICS: MetricRecord(
                {records.NUM_EXAMPLES: len(round_.train), "loss": loss}
            ),
        }
    )
