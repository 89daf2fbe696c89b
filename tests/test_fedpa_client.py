"""The FedPA client step with real training: burn-in equals FedAvg, sampling equals a dense solve."""

import tomllib
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client_app import fedavg, fedpa
from client_app.app import _round
from client_app.optimizers import build_optimizer
from client_app.training import train_epochs
from task import records
from task.config import parse_run_config
from task.data import data_spec
from task.models import build_model
from task.params import flatten, model_to_record, record_to_numpy

DEFAULTS = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
NODE = {"partition-id": 2, "num-partitions": 10}


def _client_round(server_round, **run_config):
    run_config = {**DEFAULTS, "model": "logreg", **run_config}
    cfg = parse_run_config(run_config)
    arrays = model_to_record(build_model(cfg, data_spec(cfg)))
    content = RecordDict(
        {records.ARRAYS: arrays, records.CONFIG: ConfigRecord({records.SERVER_ROUND: server_round})}
    )
    msg = Message(content, dst_node_id=5, message_type=MessageType.TRAIN)
    ctx = Context(run_id=1, node_id=5, node_config=NODE, state=RecordDict(), run_config=run_config)
    return _round(msg, ctx)[0], record_to_numpy(arrays)


def test_burn_in_round_sends_the_fedavg_delta():
    round_, theta = _client_round(server_round=1, **{"burnin-rounds": 1, "local-epochs": 3})
    delta = record_to_numpy(fedpa.train(round_).array_records[records.ARRAYS])
    weights = record_to_numpy(fedavg.train(round_)[records.ARRAYS])
    for k in theta:
        np.testing.assert_allclose(delta[k], weights[k] - theta[k], rtol=0, atol=1e-6)


def test_sampling_round_delta_equals_dense_shrinkage_solve():
    rho, epochs, burnin = 0.5, 5, 1
    round_, theta = _client_round(
        server_round=3,
        **{"burnin-rounds": 1, "local-epochs": epochs, "local-burnin-epochs": burnin,
           "shrinkage-rho": rho},
    )
    reply = fedpa.train(round_)
    delta = flatten(record_to_numpy(reply.array_records[records.ARRAYS])).astype(np.float64)
    metrics = reply.metric_records[records.METRICS]
    assert metrics["fedpa-samples"] == epochs - burnin

    # Re-run the same local training and keep every iterate, then solve densely in float64.
    model = round_.model_at()
    params = list(model.parameters())
    iterates, samples = [], []
    train_epochs(
        model, round_.train, build_optimizer(round_.cfg, params, round_.cfg.local_lr, len(round_.train)), epochs,
        round_.cfg.batch_size, round_.device, round_.seed,
        after_step=lambda: iterates.append(torch.cat([p.detach().reshape(-1) for p in params]).double()),
        after_epoch=lambda e: samples.append(torch.stack(iterates[-_steps_per_epoch(round_):]).mean(0)),
    )
    x = torch.stack(samples[burnin:]).numpy()
    l = len(x)
    mu = x.mean(0)
    theta_vec = flatten(theta).astype(np.float64)
    rho_l = 1 / (1 + (l - 1) * rho)
    sigma = rho_l * np.eye(x.shape[1]) + (1 - rho_l) * np.cov(x, rowvar=False, ddof=1)
    expected = np.linalg.solve(sigma, mu - theta_vec)
    np.testing.assert_allclose(delta, expected, rtol=1e-3, atol=1e-5)
    assert metrics["correction-norm"] > 0


def _steps_per_epoch(round_):
    return -(-len(round_.train) // round_.cfg.batch_size)


def test_non_finite_delta_is_sent_as_zeros_with_weight_zero():
    round_, _ = _client_round(server_round=1, lr=1e38, **{"burnin-rounds": 5, "local-epochs": 3})
    reply = fedpa.train(round_)
    assert reply.metric_records[records.METRICS][records.NUM_EXAMPLES] == 0
    assert all(not a.any() for a in record_to_numpy(reply.array_records[records.ARRAYS]).values())
