"""The ServerApp: validate the run config, build the strategy, run the rounds, write outputs."""

from __future__ import annotations

import dataclasses
import time
import uuid
from logging import ERROR, INFO, WARNING
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from server_app.checkpoint import Checkpoint, check_compatible, load_checkpoint, save_checkpoint
from server_app.evaluation import evaluate_bma, evaluate_mean, round_temperature
from server_app.outputs import POSTERIOR, RunOutputs, posterior_arrays
from server_app.uncertainty import UncertaintyEvaluation
from server_app.personal import PERSONAL_PLOT, personal_summary, plot_personal
from task.personal import PERSONAL_PREFIX
from strategies import STRATEGIES
from strategies.base import FederatedStrategy
from task import records
from task.config import ConfigError, RunConfig, parse_run_config
from task.data import check_partitions, data_spec, server_test_set
from task.models import build_model, resolve_device
from task.params import model_to_record, numpy_to_record, record_to_numpy

app = ServerApp()


def payload_bytes(content: RecordDict) -> int:
    return sum(int(r.count_bytes()) for r in content.values())


def fp32_payload_bytes(content: RecordDict, model_bytes: int) -> int:
    """What `content` would take with every ArrayRecord sent as the model in float32 (each
    carries one model-sized vector), for the compression ratio."""
    arrays = content.array_records
    return payload_bytes(content) - sum(int(r.count_bytes()) for r in arrays.values()) + len(
        arrays
    ) * model_bytes


def compression_ratio(messages: list[Message], model_bytes: int) -> float | None:
    """fp32 bytes over encoded bytes of the messages (None: nothing was sent)."""
    sent = sum(payload_bytes(m.content) for m in messages)
    return sum(fp32_payload_bytes(m.content, model_bytes) for m in messages) / sent if sent else None


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        cfg = parse_run_config(context.run_config)
        run(grid, cfg)
    except ConfigError as err:
        log(ERROR, "%s", err)
        raise  # the run ends finished:failed


def run(grid: Grid, cfg: RunConfig) -> RunOutputs:
    spec, test = data_spec(cfg), server_test_set(cfg)
    device = resolve_device(cfg.device)
    model = build_model(cfg, spec)
    arrays = model_to_record(model)
    model_bytes = int(arrays.count_bytes())
    strategy: FederatedStrategy = STRATEGIES[cfg.strategy](cfg, arrays)
    # The run id names every artifact; the state key names the clients' lasting state.
    run_id, state_key, first_round, temperature = uuid.uuid4().hex, uuid.uuid4().hex, 1, 1.0
    resumed = load_checkpoint(Path(cfg.resume_from)) if cfg.resume_from else None
    if resumed is not None:
        check_compatible(resumed, cfg, record_to_numpy(arrays), strategy.state_dict()[0])
        arrays = numpy_to_record(resumed.global_arrays)
        try:
            strategy.load_state_dict(resumed.strategy_arrays, resumed.strategy_meta)
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise ConfigError(
                f"resume-from: the checkpoint's strategy state does not fit ({type(err).__name__}: "
                f"{' '.join(str(err).split())})"
            ) from None
        run_id, state_key, first_round = resumed.run_id, resumed.state_key, resumed.round + 1
        temperature = resumed.temperature
    check_partitions(cfg, spec, len(list(grid.get_node_ids())))
    outputs = RunOutputs(cfg, run_id)
    # Simulated nodes keep their lasting state here (client_app/state.py); a resumed run keeps
    # the folder of the run it continues, wherever its own outputs go.
    client_state_dir = outputs.dir / records.CLIENT_STATE_FOLDER
    if resumed is not None:
        client_state_dir = Path(resumed.client_state_dir)
        outputs.continue_from(Path(cfg.resume_from), resumed.round)
        log(INFO, "Resuming from round %d of %s", resumed.round, cfg.resume_from)
    client_state_dir.mkdir(parents=True, exist_ok=True)
    uncertainty, report = UncertaintyEvaluation(cfg, test), None
    log(INFO, "Run %s: %s on %s, results in %s", cfg.strategy, cfg.model, cfg.dataset, outputs.dir)
    # Sent with every message: clients file their lasting state under this key (and, simulated
    # nodes on this machine, in this folder).
    config = ConfigRecord(
        {records.STATE_KEY: state_key, records.CLIENT_STATE_DIR: str(client_state_dir)}
    )

    for server_round in range(first_round, cfg.num_server_rounds + 1):
        started = time.perf_counter()
        train_msgs = list(strategy.configure_train(server_round, arrays, config, grid))
        replies = list(grid.send_and_receive(train_msgs, timeout=cfg.round_timeout))
        # Counted as received: aggregating decodes compressed replies in place.
        delivered = [m for m in replies if not m.has_error()]
        bytes_up = sum(payload_bytes(m.content) for m in delivered)
        compression_up = compression_ratio(delivered, model_bytes)
        new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
        report = strategy.last_round

        eval_msgs = list(strategy.configure_evaluate(server_round, arrays, config, grid))
        eval_replies = list(grid.send_and_receive(eval_msgs, timeout=cfg.round_timeout))
        client_eval = strategy.aggregate_evaluate(server_round, eval_replies)
        temperature = round_temperature(cfg, client_eval, temperature)

        entry = {"round": server_round, **evaluate_mean(model, arrays, test, device, temperature)}
        if (posterior := strategy.posterior()) is not None:
            entry |= evaluate_bma(
                model, posterior, test, device, cfg.eval_mc_samples, cfg.seed + server_round,
                temperature,
            )
        entry["temperature"] = temperature
        entry |= {
            "sampled": len(train_msgs),
            "replies": report.accepted,
            "rejected": report.rejected,
            "failed": report.failed + len(train_msgs) - len(replies),
            "skipped": report.skipped,
            "problems": report.reasons,
            "bytes_down": sum(payload_bytes(m.content) for m in train_msgs),
            "bytes_up": bytes_up,
            "compression_down": compression_ratio(train_msgs, model_bytes),
            "compression_up": compression_up,
            "eval_bytes_down": sum(payload_bytes(m.content) for m in eval_msgs),
            "eval_replies": strategy.last_evaluate.accepted,
            "eval_rejected": strategy.last_evaluate.rejected,
            "eval_failed": strategy.last_evaluate.failed + len(eval_msgs) - len(eval_replies),
            "eval_problems": strategy.last_evaluate.reasons,
        }
        entry |= _prefixed("train", train_metrics) | _prefixed("client", client_eval)
        if uncertainty.due(server_round):
            report = uncertainty(
                model, arrays, posterior, device, cfg.seed + server_round, temperature
            )
            entry["uncertainty"] = report.metrics
        if (personal := personal_summary(eval_replies)) is not None:
            entry["personalization"] = personal
            outputs.results["personalization"] = {"round": server_round, **personal}
        entry["seconds"] = time.perf_counter() - started
        outputs.add_round(entry)
        checkpoint = Checkpoint(
            server_round, state_key, cfg.to_dict(), record_to_numpy(arrays),
            *strategy.state_dict(), client_state_dir=str(client_state_dir), run_id=run_id,
            temperature=temperature,
        )
        save_checkpoint(outputs.dir, checkpoint)
        log(INFO, "%s", progress_line(entry, cfg.num_server_rounds))

    _announce_finish(grid, cfg, config)
    save_checkpoint(outputs.dir, dataclasses.replace(checkpoint, finished=True))
    _remove_empty_folders(client_state_dir)
    outputs.save_model(record_to_numpy(arrays), spec, test, report, temperature)
    if (posterior := strategy.posterior()) is not None:
        outputs.save_arrays(POSTERIOR, posterior_arrays(*posterior))
    outputs.plot()
    plot_personal(outputs.results["rounds"], outputs.dir / PERSONAL_PLOT, cfg.strategy)
    outputs.mark_completed()
    log(INFO, "Results: %s", outputs.dir)
    return outputs


def _announce_finish(grid: Grid, cfg: RunConfig, config: ConfigRecord) -> None:
    """Tell every connected node that the run is over, so it can delete its saved state."""
    content = RecordDict({records.CONFIG: config})
    messages = [
        Message(content, dst_node_id=node, message_type=f"{MessageType.QUERY}.{records.FINISH_ACTION}")
        for node in grid.get_node_ids()
    ]
    grid.send_and_receive(messages, timeout=min(cfg.round_timeout, 60.0))


def _remove_empty_folders(root: Path) -> None:
    """Remove the client-state folder once the nodes deleted their files; keep what is left."""
    for folder in sorted(root.glob("*/"), reverse=True):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()
    elif root.is_dir():
        personal = sorted(root.rglob(f"{PERSONAL_PREFIX}-*.npz"))
        if personal:  # kept on purpose: `bayesfl predict --personal` reads them
            log(INFO, "Personal models of %d node(s) kept in %s", len(personal), root)
        if any(p.is_file() and p not in personal for p in root.rglob("*")):
            log(WARNING, "Client state left in %s (nodes that missed the end of the run)", root)


def _prefixed(prefix: str, metrics: dict | None) -> dict:
    return {f"{prefix}_{k}".replace("-", "_"): v for k, v in (metrics or {}).items()}


def progress_line(entry: dict, num_rounds: int) -> str:
    line = (
        f"[round {entry['round']}/{num_rounds}] acc {entry['accuracy']:.4f} "
        f"nll {entry['nll']:.4f} ece {entry['ece']:.4f}"
    )
    if entry.get("temperature", 1.0) != 1.0:
        line += f" (T {entry['temperature']:g})"
    if "bma_accuracy" in entry:
        line += f" | bma acc {entry['bma_accuracy']:.4f} nll {entry['bma_nll']:.4f}"
    line += f" | replies {entry['replies']}/{entry['sampled']} | {entry['seconds']:.1f}s"
    return line + (" | SKIPPED" if entry["skipped"] else "")
