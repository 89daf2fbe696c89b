"""Personalized models end to end (in-process federations): every kind reports global and
personal scores, leaves the federation's training untouched, files a personal model that a
restarted node and `bayesfl predict --personal` read back."""

import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from benchmarks.inprocess import default_run_config, simulate
from client_app.app import app as client_app
from client_app.local import node_data
from server_app.checkpoint import load_checkpoint
from server_app.personal import personal_summary
from task import records
from task.config import ConfigError, parse_run_config
from task.metrics import classification_metrics
from task.params import numpy_to_record
from task.predict import load_personal_model, main as predict_main, predict

NODES = 3
SGD = {"model": "logreg", "num-server-rounds": 2, "local-epochs": 1, "personal-eval-every": 1}
BAYES = {**SGD, "strategy": "bayes-admm", "optimizer": "ivon", "model": "mlp", "mlp-hidden": "16",
         "eval-mc-samples": 2}
# Keys of a round that personal scoring adds; every other one must not move.
PERSONAL_KEYS = ("personalization", "client_personal_")


def _run(tmp_path: Path, name: str, overrides: dict):
    return simulate({**overrides, "output-dir": str(tmp_path / name)}, NODES)


def _federation_part(rounds: list[dict]) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k != "seconds" and not k.startswith(PERSONAL_KEYS)}
        for r in rounds
    ]


@pytest.mark.parametrize(
    "base, kind",
    [(SGD, "finetune"), (SGD, "ditto"), (BAYES, "posterior")],
    ids=["finetune", "ditto", "posterior"],
)
def test_each_kind_reports_scores_and_leaves_training_bit_identical(tmp_path, base, kind):
    off = _run(tmp_path, "off", base).results
    # Same-length folder names: messages carry the client-state folder, bytes are compared.
    on_outputs = _run(tmp_path, "on_", {**base, "personalize": kind})
    on = on_outputs.results
    # Personalization off is the federation as it was; on, the federation trains identically.
    assert _federation_part(on["rounds"]) == _federation_part(off["rounds"])
    assert "personalization" not in off and not any("personal" in k for r in off["rounds"] for k in r)
    for entry in on["rounds"]:  # personal-eval-every 1: every round
        summary = entry["personalization"]
        assert summary["nodes"] == NODES and summary["nodes_with_personal_model"] == NODES
        models = {"global", "personal"} | ({"personal_bma"} if kind == "posterior" else set())
        assert models <= set(summary)
        for model in models:
            for metric in ("accuracy", "nll", "ece"):
                stats = summary[model][metric]
                assert all(math.isfinite(v) for v in stats.values())
                worst, mean = stats["worst10"], stats["node_mean"]
                assert worst <= mean if metric == "accuracy" else worst >= mean
        # The global model's scores are the client-side evaluation the run already reports.
        assert summary["global"]["accuracy"]["weighted"] == pytest.approx(entry["client_accuracy"])
    assert on["personalization"]["round"] == SGD["num-server-rounds"]
    assert (on_outputs.dir / "personal.png").stat().st_size > 0
    files = sorted((on_outputs.dir / "client-state").rglob("personal-*.npz"))
    assert len(files) == NODES  # kept after the run: the node's product


def test_fine_tuning_on_a_nodes_own_labels_beats_the_global_model_there(tmp_path):
    overrides = {**SGD, "num-server-rounds": 3, "partitioner": "pathological",
                 "personalize": "finetune", "personal-epochs": 3}
    summary = _run(tmp_path, "ft", overrides).results["personalization"]
    assert summary["personal"]["accuracy"]["node_mean"] > summary["global"]["accuracy"]["node_mean"]


def _evaluate_on_fresh_node(run_dir: Path, partition: int, overrides: dict) -> dict:
    """What a restarted node (empty Context.state) reports for the run's last evaluation."""
    checkpoint = load_checkpoint(run_dir)
    run_config = {**default_run_config(), **overrides, "output-dir": str(run_dir)}
    context = Context(
        run_id=99, node_id=partition + 1, state=RecordDict(), run_config=run_config,
        node_config={"partition-id": partition, "num-partitions": NODES},
    )
    config = ConfigRecord({
        records.SERVER_ROUND: checkpoint.round,
        records.STATE_KEY: checkpoint.state_key,
        records.CLIENT_STATE_DIR: str(run_dir / "client-state"),
    })
    content = RecordDict({records.ARRAYS: numpy_to_record(checkpoint.global_arrays),
                          records.CONFIG: config})
    reply = client_app(Message(content, dst_node_id=partition + 1,
                               message_type=MessageType.EVALUATE), context)
    assert not reply.has_error(), reply.error.reason
    return dict(reply.content.metric_records[records.METRICS])


@pytest.mark.parametrize("kind, base", [("ditto", SGD), ("posterior", BAYES)])
def test_personal_model_survives_a_restart_and_predict_uses_it(tmp_path, kind, base, capsys):
    overrides = {**base, "personalize": kind}
    run_dir = _run(tmp_path, "run", overrides).dir
    cfg = parse_run_config({**default_run_config(), **overrides})
    for partition in range(NODES):
        scores = _evaluate_on_fresh_node(run_dir, partition, overrides)
        assert scores["personal-trained"] == 1
        # The file the restarted node read is the model `predict --personal` loads.
        folder = run_dir / "client-state" / f"partition-{partition}"
        model = load_personal_model(run_dir, folder)
        _, test, _ = node_data(cfg, (("num-partitions", NODES), ("partition-id", partition)))
        if kind == "posterior":
            assert model.precision is not None
        plain = predict(model, test.x, samples=1) if kind == "ditto" else None
        if plain is not None:
            expected = classification_metrics(plain.probs, test.y)
            for metric, value in expected.items():
                assert scores[f"personal-{metric}"] == pytest.approx(value, abs=1e-9)
        else:  # the node's mean prediction: the same weights without the weight draws
            from dataclasses import replace

            mean_only = predict(replace(model, precision=None), test.x)
            expected = classification_metrics(mean_only.probs, test.y)
            assert scores["personal-accuracy"] == pytest.approx(expected["accuracy"], abs=1e-9)
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, x=test.x, y=test.y)
    assert predict_main([str(run_dir), str(inputs), "--personal", str(folder), "--samples", "2"]) == 0
    assert "accuracy" in capsys.readouterr().out
    # A folder with no personal model is refused with one line.
    assert predict_main([str(run_dir), str(inputs), "--personal", str(tmp_path)]) == 2
    assert "holds 0 personal model files" in capsys.readouterr().err


def test_auto_weight_holds_out_validation_data_and_picks_lambda_there(tmp_path):
    overrides = {**BAYES, "personalize": "posterior", "personal-weight": "auto"}
    results = _run(tmp_path, "auto", overrides).results
    cfg = parse_run_config({**default_run_config(), **overrides})
    held = parse_run_config({**default_run_config(), **BAYES})
    full = sum(len(node_data(held, (("num-partitions", NODES), ("partition-id", p)))[0])
               for p in range(NODES))
    trained = results["rounds"][0]["train_num_examples"]
    assert trained < full  # the validation part is not trained on
    assert 0.0 <= results["personalization"]["w_node_mean"] <= 1.0
    assert cfg.personal_lambda_is_auto


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"personalize": "posterior"}, "needs a client that reports its Gaussian posterior"),
        ({"personalize": "posterior", "strategy": "bayes-admm", "optimizer": "sgd",
          "posterior": "isotropic"}, "needs a client that reports"),
        ({"personalize": "finetune", "optimizer": "ivon"}, "needs optimizer 'sgd'"),
        ({"personalize": "ditto", "client-test-fraction": 0.0}, "client-test-fraction"),
        ({"personal-weight": -1.0}, "'personal-weight'"),
        ({"personal-eval-every": 0}, "'personal-eval-every'"),
    ],
)
def test_bad_personalization_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        parse_run_config({**default_run_config(), **overrides})


def test_personal_rounds_are_every_nth_and_the_last():
    from client_app.personal import evaluates

    cfg = parse_run_config({**default_run_config(), "num-server-rounds": 7,
                            "personalize": "finetune", "personal-eval-every": 3})
    assert [r for r in range(1, 8) if evaluates(cfg, r)] == [3, 6, 7]
    off = parse_run_config({**default_run_config(), "personal-eval-every": 1})
    assert not any(evaluates(off, r) for r in range(1, 30))


def _reply(metrics: dict) -> Message:
    instruction = Message(RecordDict(), dst_node_id=1, message_type=MessageType.EVALUATE)
    return Message(RecordDict({records.METRICS: MetricRecord(metrics)}), reply_to=instruction)


def test_summary_weights_nodes_and_takes_the_worst_tenth():
    accuracies = [0.1 * i for i in range(1, 11)]  # 10 nodes: the worst 10% is one node
    replies = [
        _reply({records.NUM_EXAMPLES: i, "accuracy": 0.5, "nll": 1.0, "ece": 0.1,
                "personal-accuracy": a, "personal-nll": 2.0 - a, "personal-ece": a / 10,
                "personal-trained": 1})
        for i, a in enumerate(accuracies, start=1)
    ]
    replies.append(_reply({records.NUM_EXAMPLES: 5, "accuracy": 0.9}))  # no personal scores
    summary = personal_summary(replies)
    assert summary["nodes"] == 10 and summary["nodes_with_personal_model"] == 10
    acc = summary["personal"]["accuracy"]
    weights = np.arange(1, 11)
    assert acc["weighted"] == pytest.approx(np.dot(accuracies, weights) / weights.sum())
    assert acc["node_mean"] == pytest.approx(0.55)
    assert acc["worst10"] == pytest.approx(0.1)
    assert summary["personal"]["nll"]["worst10"] == pytest.approx(1.9)  # highest NLL
    assert summary["global"]["accuracy"]["worst10"] == pytest.approx(0.5)
    assert personal_summary([_reply({records.NUM_EXAMPLES: 5, "accuracy": 0.9})]) is None
