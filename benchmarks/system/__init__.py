"""System costs: local step time per optimizer, server aggregation time and memory, the split of
a round into local compute and everything else, and bytes per round.

    python -m benchmarks.system                                            # everything (~30 min)
    python -m benchmarks.system --quick --out /tmp/system-quick           # smoke run (< 2 min)
    python -m benchmarks.system --sections step,aggregation --threads 1   # some tables only

Writes `<out>/system.json` (every table: a list of rows, plus the machine) and `<out>/system.md`
(the same tables in Markdown). Tables:

- `step_time`: one local step (`client_app.training.minibatch_step`: forward, backward, optimizer
  step) of SGD, Adam, stock `ivon.IVON`, our IVON-ADMM before the hot-path rewrite
  (`tests.ivon_admm_reference.ReferenceIVONADMM`) and `task.ivon_admm.IVONADMM` with a prior and
  duals set, on the same model and batch. The optimizers run interleaved in rotating order, block after block; the table holds
  the median step time and the median over blocks of the ratio to Adam (and SGD) of the same block.
- `aggregation`: `aggregate_train` of a real strategy object on K replies of P parameters (the
  check of the replies, their conversion and the server math), its time, and its working memory:
  the tracemalloc peak of the call, i.e. what it allocates beyond the replies it was handed.
  The replies share a few distinct arrays, so that K = 1000 fits in memory; the work is the same.
- `round_split`: a federation of the real ServerApp loop and ClientApp handlers in this process
  (`benchmarks.inprocess`), with the local training (`train_epochs`) of every client, the client
  handlers, the aggregation and the server's evaluation timed inside each round.
- `simulation`: the same runs through `flwr run` (Ray simulation engine, local SuperLink); the
  round seconds there minus the local compute measured in process is everything else.
- `flower_floor`: rounds of a no-op Flower app (`benchmarks/flower_floor`: the same nodes, the
  same model-sized messages, clients that only echo) through `flwr run`: Flower's own cost.
- `deployment`: the same through the loopback deployment (`scripts/launch_federation.py`), when
  that launcher is in this checkout.
- `bytes`: bytes down and up per round per strategy, from the runs' results.json.

One module per concern: `settings` (the sizes of a full and a quick run), `step`, `aggregation`,
`rounds` (in process, with timers), `real_runs` (`flwr run`, the no-op app, the loopback
deployment), `report` (summaries, machine, Markdown) and `run` (the command line).
"""
