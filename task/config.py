"""The run configuration: one pydantic model shared by the ServerApp and the ClientApp.

Keys are kebab-case (Flower style) and mirror `[tool.flwr.app.config]` in pyproject.toml.
`parse_run_config` turns any validation problem into one line naming the key, the value and
what is allowed.
"""

from __future__ import annotations

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
    # Share of each client's data held out (seeded) for client-side evaluation; 0: none, every
    # example trains and clients send no evaluation metrics.
    client_test_fraction: float = Field(0.2, ge=0, lt=1)
    model: ModelName = "mlp"
    mlp_hidden: str = "200,100"
    activation: Literal["relu", "sigmoid", "tanh"] = "relu"
    local_epochs: Count = Field(5, ge=1)
    batch_size: Count = Field(32, ge=1)
    lr: float = Field(0.1, gt=0)
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
    rho: float = Field(0.2, gt=0)
    dual_damping: float = Field(0.1, gt=0, le=1)
    temperature: float = Field(1.0, gt=0)
    prior_precision: float = Field(1.0, gt=0)
    cosine_lr: bool = True
    posterior: Literal["diagonal", "isotropic"] = "diagonal"
    eval_mc_samples: Count = Field(32, ge=1)
    # IVON (optimizer = "ivon", and the BayesADMM client).
    hess_init: float = Field(0.1, gt=0)
    beta2: float = Field(0.9998, gt=0, le=1)
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
    more = f" (and {len(err.errors()) - 1} more problem(s))" if len(err.errors()) > 1 else ""
    return f"run config: '{key}' = {value!r} is invalid: {message}{more}"
