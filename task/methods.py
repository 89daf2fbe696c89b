"""The one registry of federated methods: what the `strategy` key's value stands for on each side.

A method names its server strategy and its client step by import path: the config reads this
registry to validate a run, and must not import the torch and Flower code of either half.
`strategies.STRATEGIES` and `client_app.app.CLIENT_STEPS` are resolved from it.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Method:
    server: str  # "module:attribute" of the server strategy class
    client: str  # "module:attribute" of the client step, ClientRound -> RecordDict
    # Posterior family -> the client optimizers that can fit it; None: the method has no
    # posterior of its own and runs with any optimizer.
    optimizers: Mapping[str, tuple[str, ...]] | None
    # Settings under which the method does its own thing within a few short rounds on digits
    # (the end-to-end, resume and deployment tests and the round benchmarks run it so).
    short_run: Mapping[str, Any]
    # `lr = "auto"`: the method's own learning rate for an optimizer, where the optimizer's own
    # (task.config.AUTO_LR) does not suit it.
    auto_lr: Mapping[str, float] = field(default_factory=dict)

    def allows(self, optimizer: str, posterior: str) -> bool:
        return self.optimizers is None or optimizer in self.optimizers[posterior]


METHODS: dict[str, Method] = {
    "fedavg": Method(
        server="strategies.fedavg:FedAvg",
        client="client_app.fedavg:train",
        optimizers=None,
        short_run={},
    ),
    # Samples the posterior from round 2 (one FedAvg-like burn-in round), from the 2 epochs
    # after its 1 local burn-in epoch.
    "fedpa": Method(
        server="strategies.fedpa:FedPA",
        client="client_app.fedpa:train",
        optimizers=None,
        short_run={"burnin-rounds": 1, "local-epochs": 3, "local-burnin-epochs": 1},
    ),
    # A diagonal posterior is IVON's, an isotropic one comes from SGD.
    "bayes-admm": Method(
        server="strategies.bayes_admm:BayesADMM",
        client="client_app.bayes_admm:train",
        optimizers={"diagonal": ("ivon",), "isotropic": ("sgd",)},
        short_run={
            "optimizer": "ivon", "local-epochs": 2, "lr": 0.0005, "temperature": 0.001,
            "hess-init": 0.001, "dual-damping": 0.001, "eval-mc-samples": 8,
        },
        # The ADMM penalty holds each client near the global, so IVON's steps can be 3x those
        # of a free IVON client: on MNIST-1D's CNN 1e-3 stalls at 37% where 3e-3 reaches 59%
        # (20 rounds), and on digits it gains a point (docs/BENCHMARKS.md, "Defaults").
        auto_lr={"ivon": 3e-3},
    ),
}


def resolve(path: str) -> Any:
    """The object a "module:attribute" import path names."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)
