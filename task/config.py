"""The run configuration: one pydantic model shared by the ServerApp and the ClientApp.

Keys are kebab-case (Flower style) and mirror `[tool.flwr.app.config]` in pyproject.toml.
`parse_run_config` turns any validation problem into one line naming the key, the value and
what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

StrategyName = Literal["fedavg", "fedpa", "bayes-admm"]
OptimizerName = Literal["sgd", "ivon"]
PartitionerName = Literal["iid", "dirichlet", "pathological"]
ModelName = Literal["logreg", "mlp", "cnn"]


# TOML gives true ints; strictness keeps `true` or 2.5 from passing as a count.
Count = Annotated[int, Strict()]
# A key that may say "auto": the value then follows from the other keys, resolved in one place
# (RunConfig's `local_lr`, `local_beta2`, `admm_rho`) that client and server both use. Flower's
# run config cannot hold None, so a string stands for it.
Auto = Literal["auto"]

# `lr = "auto"`: each optimizer's own learning rate, found on digits (docs/BENCHMARKS.md,
# "Defaults (no tuning)"). SGD and IVON need rates two orders of magnitude apart.
AUTO_LR: dict[str, float] = {"sgd": 0.1, "ivon": 1e-3}
# `rho = "auto"`: BayesADMM's penalty per posterior family. The isotropic variant fixes every
# precision to 1, so the server keeps alpha = 1 / (1 + K rho) of the unit prior N(0, I) in each
# new mean: at rho 0.5 and K = 10 a sixth, which holds the network near 0 (61% on digits); at 10,
# a 1/101 (docs/BENCHMARKS.md, "Defaults (no tuning)").
AUTO_RHO: dict[str, float] = {"diagonal": 0.5, "isotropic": 10.0}
# `beta2 = "auto"`: the share of its local curvature that IVON's Hessian average takes in during
# one round of T steps, 1 - beta2^T (docs/ALGORITHMS.md, "Choosing beta2"). 1 - 0.998^40, the
# value the digits sweeps chose (beta2 0.998 at T = 40 steps per round).
AUTO_BETA2_SHARE = 1.0 - 0.998**40


def auto_beta2(steps_per_round: int) -> float:
    """The beta2 with 1 - beta2^T = AUTO_BETA2_SHARE for T = `steps_per_round` steps."""
    if steps_per_round < 1:
        raise ValueError(f"steps per round must be at least 1, got {steps_per_round}")
    return (1.0 - AUTO_BETA2_SHARE) ** (1.0 / steps_per_round)


class ConfigError(ValueError):
    """A run config (or node config) that cannot be used; the message is one line."""


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class RunConfig(BaseModel):
    model_config = ConfigDict(
        alias_generator=_kebab,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,
    )

    strategy: StrategyName = "fedavg"
    optimizer: OptimizerName = "sgd"
    num_server_rounds: Count = Field(20, ge=1)
    # "digits", "synthetic", or a Hugging Face data set id read through flwr-datasets
    # (e.g. "mnist", "fashion_mnist", "cifar10", or a local folder of data files).
    dataset: str = Field("digits", min_length=1)
    synthetic_alpha: float = Field(1.0, ge=0)
    synthetic_beta: float = Field(1.0, ge=0)
    partitioner: PartitionerName = "dirichlet"
    dirichlet_alpha: float = Field(0.5, gt=0)
    classes_per_client: Count = Field(2, ge=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    model: ModelName = "mlp"
    mlp_hidden: str = "200,100"
    activation: Literal["relu", "sigmoid", "tanh"] = "relu"
    local_epochs: Count = Field(5, ge=1)
    batch_size: Count = Field(32, ge=1)
    # "auto": the optimizer's own default (AUTO_LR); a number sets it for either optimizer.
    lr: Annotated[float, Field(gt=0)] | Auto = "auto"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    server_lr: float = Field(1.0, gt=0)
    server_momentum: float = Field(0.0, ge=0, lt=1)
    # FedPA: server rounds of plain FedAvg before sampling, local epochs discarded as burn-in,
    # and the shrinkage rate of the covariance estimate (0: FedAvg on iterate averages).
    burnin_rounds: Count = Field(10, ge=0)
    local_burnin_epochs: Count = Field(1, ge=0)
    shrinkage_rho: float = Field(0.1, ge=0)
    # BayesADMM: client penalty rho, dual damping gamma, likelihood temperature tau, prior
    # precision delta, a cosine learning-rate schedule over rounds, and the posterior family.
    # Defaults from the digits sweeps (docs/BENCHMARKS.md); the temperature also sets IVON's
    # ess = N / tau under FedAvg and FedPA (the old tau = 1 left IVON at chance on digits).
    rho: Annotated[float, Field(gt=0)] | Auto = "auto"
    dual_damping: float = Field(1e-3, gt=0, le=1)
    temperature: float = Field(1e-3, gt=0)
    prior_precision: float = Field(1.0, gt=0)
    cosine_lr: bool = True
    posterior: Literal["diagonal", "isotropic"] = "diagonal"
    eval_mc_samples: Count = Field(32, ge=1)
    # IVON (optimizer = "ivon", and the BayesADMM client). beta2 "auto": from the client's
    # steps per round (auto_beta2).
    hess_init: float = Field(1e-3, gt=0)
    beta2: Annotated[float, Field(gt=0, le=1)] | Auto = "auto"
    mc_samples: Count = Field(1, ge=1)
    fraction_train: float = Field(1.0, gt=0, le=1)
    fraction_evaluate: float = Field(1.0, ge=0, le=1)
    min_train_nodes: Count = Field(2, ge=1)
    round_timeout: float = Field(600.0, gt=0)
    seed: Count = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    output_dir: str = ""
    # A run folder (or checkpoint.npz) to continue from its last completed round.
    resume_from: str = ""

    @field_validator("mlp_hidden")
    @classmethod
    def _hidden_sizes_are_positive_ints(cls, value: str) -> str:
        parts = [p.strip() for p in value.split(",") if p.strip()]
        if not parts or not all(p.isdecimal() and p.isascii() and int(p) > 0 for p in parts):
            raise ValueError("must be a comma-separated list of positive integers, e.g. '200,100'")
        return ",".join(parts)

    @model_validator(mode="after")
    def _bayes_admm_client_fits_its_posterior(self) -> "RunConfig":
        if self.strategy != "bayes-admm":
            return self
        needed = "ivon" if self.posterior == "diagonal" else "sgd"
        if self.optimizer != needed:
            raise ValueError(
                f"strategy 'bayes-admm' with posterior '{self.posterior}' needs optimizer "
                f"'{needed}', got '{self.optimizer}'"
            )
        return self

    @property
    def local_lr(self) -> float:
        """The local optimizer's learning rate: `lr`, or the optimizer's own if "auto"."""
        return AUTO_LR[self.optimizer] if self.lr == "auto" else self.lr

    @property
    def admm_rho(self) -> float:
        """BayesADMM's penalty: `rho`, or the posterior family's own if "auto"."""
        return AUTO_RHO[self.posterior] if self.rho == "auto" else self.rho

    def steps_per_round(self, num_examples: int) -> int:
        """Local optimizer steps in one round on `num_examples` training examples."""
        return self.local_epochs * math.ceil(num_examples / self.batch_size)

    def local_beta2(self, num_examples: int) -> float:
        """IVON's beta2 on a client with `num_examples`: `beta2`, or auto_beta2 if "auto"."""
        if self.beta2 == "auto":
            return auto_beta2(self.steps_per_round(num_examples))
        return self.beta2

    def curvature_share(self, num_examples: int) -> float:
        """1 - beta2^T: the share of a round's curvature IVON's Hessian average takes in on a
        client with `num_examples`, its average restarting at 0 (AUTO_BETA2_SHARE with "auto")."""
        return 1.0 - self.local_beta2(num_examples) ** self.steps_per_round(num_examples)

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.mlp_hidden.split(","))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True)


def parse_run_config(raw: Mapping[str, Any]) -> RunConfig:
    """Validate a Flower run config; raise ConfigError with one line on the first problem."""
    try:
        return RunConfig.model_validate(dict(raw))
    except ValidationError as err:
        raise ConfigError(_describe(err, raw)) from None


def _describe(err: ValidationError, raw: Mapping[str, Any]) -> str:
    first = err.errors()[0]
    if not first["loc"]:  # a rule across several keys
        return f"run config: {first['msg'].removeprefix('Value error, ')}"
    key = str(first["loc"][0])
    value = raw.get(key, first.get("input"))
    if first["type"] == "extra_forbidden":
        known = ", ".join(sorted(RunConfig.model_json_schema(by_alias=True)["properties"]))
        return f"run config: unknown key '{key}' (= {value!r}); known keys: {known}"
    message = first["msg"].removeprefix("Value error, ")
    per_type = [e for e in err.errors() if e["loc"] and str(e["loc"][0]) == key]
    if isinstance(value, str) and len(per_type) > 1:  # a number-or-"auto" key given a string
        message = "must be a number or 'auto'"
    # A key of several types ("auto" or a number) reports one error per type: count keys.
    others = len({str(e["loc"][0]) if e["loc"] else "" for e in err.errors()} - {key})
    more = f" (and {others} more problem(s))" if others else ""
    return f"run config: '{key}' = {value!r} is invalid: {message}{more}"
