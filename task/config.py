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

from task.codecs import CodecName
from task.methods import METHODS

StrategyName = Literal[tuple(METHODS)]  # type: ignore[valid-type]
OptimizerName = Literal["sgd", "ivon"]
PartitionerName = Literal["iid", "dirichlet", "pathological", "natural-id"]
ModelName = Literal["logreg", "mlp", "cnn", "cnn1d"]
# What the convolutional models take per example, as (ranks of the input shape, in words); the
# others flatten any input.
MODEL_INPUTS: dict[str, tuple[tuple[int, ...], str]] = {
    "cnn": ((3,), "image inputs (C, H, W)"),
    "cnn1d": ((1, 2), "1-D signals (L) or (C, L)"),
}


# A wider layer takes memory and time no federation here needs (65536 x 65536 floats: 16 GiB).
MAX_HIDDEN_WIDTH = 65536

# TOML gives true ints; strictness keeps `true` or 2.5 from passing as a count.
Count = Annotated[int, Strict()]
# A key that may say "auto": the value then follows from the other keys, resolved in one place
# (RunConfig's `local_lr`, `local_beta2`, `admm_rho`) that client and server both use. Flower's
# run config cannot hold None, so a string stands for it.
Auto = Literal["auto"]

# `lr = "auto"`: each optimizer's own learning rate, found on digits (docs/BENCHMARKS.md,
# "Defaults (no tuning)"), unless the method sets its own (`Method.auto_lr`). SGD and IVON need
# rates two orders of magnitude apart.
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

    strategy: StrategyName = Field(
        "fedavg", description="server method ([docs/ALGORITHMS.md](docs/ALGORITHMS.md))"
    )
    optimizer: OptimizerName = Field(
        "sgd",
        description="client optimizer (`bayes-admm` needs `ivon`, or `sgd` with "
        '`posterior = "isotropic"`)',
    )
    num_server_rounds: Count = Field(20, ge=1, description="federated rounds")
    dataset: str = Field(
        "digits",
        min_length=1,
        description="`digits`, `synthetic`, `mnist1d`, a Hugging Face id read through flwr-datasets "
        "(`mnist`, `cifar10`, ...) or a local folder of data files (see Data below)",
    )
    synthetic_alpha: float = Field(
        1.0, ge=0, description="FedProx Synthetic(alpha, beta): spread of the devices' models"
    )
    synthetic_beta: float = Field(
        1.0, ge=0, description="FedProx Synthetic(alpha, beta): spread of the devices' inputs"
    )
    mnist1d_samples: Count = Field(
        5000,
        ge=100,
        le=1_000_000,
        multiple_of=10,
        description="`mnist1d`: signals generated (as many per class; the package's default 5000)",
    )
    partitioner: PartitionerName = Field(
        "dirichlet",
        description="how the training pool is split over clients (flwr-datasets); "
        "`natural-id`: one client per value of `partition-by`",
    )
    dirichlet_alpha: float = Field(
        0.5, gt=0, description="label skew of `dirichlet` (smaller = more skewed)"
    )
    classes_per_client: Count = Field(2, ge=1, description="labels per client for `pathological`")
    partition_by: str = Field(
        "",
        description="`natural-id`: the id column (e.g. FEMNIST's `writer_id`); "
        "num-partitions must equal its number of values",
    )
    test_fraction: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="share the server keeps as its test set, of an offline data set or of the "
        "`train` split of one without a `test` split",
    )
    client_test_fraction: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="share of each node's data held out (seeded) for client-side evaluation "
        "(0: none, every example trains and clients send no evaluation metrics)",
    )
    server_val_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="offline data sets: share of the training pool held out (seeded, no client "
        "trains on it) that the server evaluates on instead of the test set, for tuning "
        "(0: off)",
    )
    model: ModelName = Field(
        "mlp",
        description="network (`cnn` needs image inputs; `cnn1d`, MNIST-1D's reference CNN, "
        "1-D signals)",
    )
    mlp_hidden: str = Field(
        "200,100",
        description=f"MLP hidden widths, comma-separated positive ints (each <= {MAX_HIDDEN_WIDTH})",
    )
    activation: Literal["relu", "sigmoid", "tanh"] = Field("relu", description="hidden activation")
    local_epochs: Count = Field(5, ge=1, description="epochs per round on each client")
    batch_size: Count = Field(32, ge=1, description="client minibatch size")
    lr: Annotated[float, Field(gt=0)] | Auto = Field(
        "auto",
        description="client learning rate; `auto`: the optimizer's own (SGD 0.1, IVON 1e-3; IVON "
        "under BayesADMM 3e-3)",
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="client SGD momentum")
    weight_decay: float = Field(0.0, ge=0, description="client SGD weight decay")
    server_lr: float = Field(
        1.0, gt=0, description="server learning rate (FedAvgM when != 1 or with momentum)"
    )
    server_momentum: float = Field(0.0, ge=0, lt=1, description="server momentum")
    # FedPA: server rounds of plain FedAvg before sampling, local epochs discarded as burn-in,
    # and the shrinkage rate of the covariance estimate (0: FedAvg on iterate averages).
    burnin_rounds: Count = Field(
        10, ge=0, description="FedPA: FedAvg rounds before posterior sampling starts"
    )
    local_burnin_epochs: Count = Field(
        1, ge=0, description="FedPA: local epochs whose IASG samples are discarded"
    )
    shrinkage_rho: float = Field(
        0.1, ge=0, description="FedPA: covariance shrinkage rate (0: FedAvg on iterate averages)"
    )
    # BayesADMM: client penalty rho, dual damping gamma, likelihood temperature tau, prior
    # precision delta, a cosine learning-rate schedule over rounds, and the posterior family.
    # Defaults from the digits sweeps (docs/BENCHMARKS.md); the temperature also sets IVON's
    # ess = N / tau under FedAvg and FedPA (the old tau = 1 left IVON at chance on digits).
    rho: Annotated[float, Field(gt=0)] | Auto = Field(
        "auto",
        description="BayesADMM: client penalty (inverse step size); `auto`: 0.5 for the "
        "diagonal posterior, 10 for the isotropic one",
    )
    dual_damping: float = Field(1e-3, gt=0, le=1, description="BayesADMM: dual damping gamma")
    temperature: float = Field(
        1e-3,
        gt=0,
        description="BayesADMM and IVON: likelihood temperature tau (ess = N / (tau rho))",
    )
    prior_precision: float = Field(
        1.0, gt=0, description="BayesADMM and IVON: prior N(0, 1/delta)"
    )
    cosine_lr: bool = Field(
        True, description="BayesADMM: cosine learning-rate schedule over rounds"
    )
    posterior: Literal["diagonal", "isotropic"] = Field(
        "diagonal",
        description="BayesADMM: diagonal Gaussians, or unit covariance (classic federated ADMM)",
    )
    eval_mc_samples: Count = Field(
        32, ge=1, le=1024, description="BayesADMM: weight draws for Bayesian model averaging"
    )
    # BayesADMM: bounds on what one reply can do to the posterior (docs/ALGORITHMS.md,
    # "Bounding a BayesADMM reply"); a clipped reply's dual increment is not accepted.
    precision_ratio_bound: float = Field(
        0.0,
        ge=0,
        description="BayesADMM: clip a reply's precision to [S_g/c, c S_g] per coordinate, "
        "c = this (>= 1; 0: off)",
    )
    precision_min: float = Field(
        0.0, ge=0, description="BayesADMM: smallest precision a reply may carry (0: off)"
    )
    precision_max: float = Field(
        1e12, gt=0, description="BayesADMM: largest precision a reply may carry"
    )
    mean_shift_bound: float = Field(
        1000.0,
        ge=0,
        description="BayesADMM: clip |m_k - m_g| to this many global standard deviations "
        "per coordinate (0: off)",
    )
    # IVON (optimizer = "ivon", and the BayesADMM client).
    hess_init: float = Field(1e-3, gt=0, description="IVON: initial Hessian h0")
    beta2: Annotated[float, Field(gt=0, le=1)] | Auto = Field(
        "auto",
        description="IVON: Hessian EMA rate; `auto`: per client, 1 - beta2^T = 7.7% for its T "
        "steps per round ([docs/ALGORITHMS.md](docs/ALGORITHMS.md))",
    )
    mc_samples: Count = Field(1, ge=1, description="IVON: weight samples per step")
    clip_radius: float = Field(
        0.0,
        ge=0,
        description="IVON: clip each coordinate of the preconditioned step g / (h + delta) to "
        "+-this before it is scaled by lr (ivon-opt's `clip_radius`; 0: off)",
    )
    # Robust aggregation for FedAvg and FedPA (docs/ALGORITHMS.md, "Robust aggregation").
    aggregation: Literal["mean", "trimmed-mean", "median", "krum", "multi-krum"] = Field(
        "mean",
        description="FedAvg/FedPA: how the client updates are combined; all but `mean` hold "
        "every reply in memory. BayesADMM: `mean` or `multi-krum` (keeps the n - f replies "
        "whose means are closest to the others', in global standard deviations)",
    )
    trim_fraction: float = Field(
        0.2, ge=0, lt=0.5, description="`trimmed-mean`: share of replies cut at each end"
    )
    krum_byzantine: Count = Field(
        1, ge=0, description="`krum`, `multi-krum`: hostile nodes f to tolerate (needs n >= 2f + 3)"
    )
    max_client_weight: float = Field(
        1.0,
        gt=0,
        le=1,
        description="FedAvg/FedPA: cap on one reply's share of the example weights (1: off)",
    )
    clip_norm: float = Field(
        0.0,
        ge=0,
        description="FedAvg/FedPA: clip each update to this L2 norm (0: off; the start value "
        "when adaptive)",
    )
    clip_norm_adaptive: bool = Field(
        False,
        description="adapt `clip-norm` each round toward `clip-norm-quantile` (Andrew et al.)",
    )
    clip_norm_quantile: float = Field(
        0.5, ge=0, le=1, description="adaptive clipping: target share of unclipped updates"
    )
    fraction_train: float = Field(
        1.0, gt=0, le=1, description="share of connected nodes sampled per round"
    )
    fraction_evaluate: float = Field(
        1.0,
        ge=0,
        le=1,
        description="share of nodes asked for client-side evaluation (0: none)",
    )
    predictive_temperature: Annotated[float, Field(gt=0, le=100)] | Auto = Field(
        "auto",
        description="temperature T dividing the logits of every prediction the run makes "
        "(mean network and BMA: server metrics, model.json, `bayesfl predict`); `auto`: fitted "
        "each round on the nodes' held-out splits, the T in 0.5..2 with the lowest client NLL "
        "(1 until nodes evaluate)",
    )
    uncertainty_eval_every: Count = Field(
        0,
        ge=0,
        description="rounds between server-side uncertainty evaluations of the global model "
        "(OOD detection, selective prediction, covariate shift; results.json, uncertainty.png); "
        "the last round is always evaluated (0: the last round only)",
    )
    min_train_nodes: Count = Field(
        2,
        ge=1,
        description="fewest nodes to sample, and fewest valid replies to update the model",
    )
    round_timeout: float = Field(
        600.0,
        gt=0,
        description="seconds to wait for replies in a round (late replies are dropped)",
    )
    seed: Count = Field(
        0,
        ge=0,
        lt=2**32,
        description="seeds data splits, model init, sampling and local training",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="`auto` uses CUDA when present"
    )
    output_dir: str = Field(
        "",
        description="where outputs go; empty: a fresh `outputs/<timestamp>-<strategy>` folder",
    )
    overwrite: bool = Field(
        False,
        description="let `output-dir` be a folder that holds files (an earlier run's artifacts "
        "are deleted first); without it such a folder is refused",
    )
    resume_from: str = Field(
        "",
        description="a run folder (or its checkpoint.npz) to continue from its last completed "
        "round ([docs/RELIABILITY.md](docs/RELIABILITY.md))",
    )
    # Personalized models (docs/ALGORITHMS.md, "Personalization").
    personalize: Literal["none", "posterior", "finetune", "ditto"] = Field(
        "none",
        description="personal model per node: `posterior` (bayes-admm, diagonal: global and "
        "local posterior interpolated), `finetune` or `ditto` (optimizer `sgd`)",
    )
    personal_weight: Annotated[float, Field(ge=0)] | Auto = Field(
        1.0,
        description="`posterior`: lambda, the local posterior's weight w = lambda/(1+lambda); "
        "`auto`: each node picks it on `personal-val-fraction` of its training data",
    )
    personal_val_fraction: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="`personal-weight = auto`: share of a node's training split held out "
        "(never trained on) to pick lambda",
    )
    personal_epochs: Count = Field(
        1, ge=1, description="`finetune`, `ditto`: local epochs that train the personal model"
    )
    ditto_lambda: float = Field(
        0.1, ge=0, description="`ditto`: proximal weight mu of (mu/2)||v - w_global||^2"
    )
    personal_eval_every: Count = Field(
        5,
        ge=1,
        description="evaluate personal models on the nodes' test splits every this many "
        "rounds (and in the last)",
    )
    # Compressed communication (docs/ALGORITHMS.md, "Compressed communication").
    uplink_codec: CodecName = Field(
        "fp32",
        description="how nodes encode their replies: `fp32` (as is), `fp16`, `bf16`, `q8` "
        "(8-bit stochastic rounding), `topk` (largest `topk-fraction`, error feedback)",
    )
    downlink_codec: CodecName = Field(
        "fp32", description="how the server encodes the global it sends (same codecs)"
    )
    codec_chunk: Count = Field(256, ge=1, description="`q8`: values per scale")
    topk_fraction: float = Field(0.01, gt=0, le=1, description="`topk`: share of values sent")
    codec_reference: Literal["none", "shift"] = Field(
        "shift",
        description="compressed payloads: `shift` sends the difference to a reference both "
        "sides hold (uplink: the global received; downlink: the previous global)",
    )

    @field_validator("mlp_hidden")
    @classmethod
    def _hidden_sizes_are_positive_ints(cls, value: str) -> str:
        parts = [p.strip() for p in value.split(",") if p.strip()]
        if not parts or not all(p.isdecimal() and p.isascii() and int(p) > 0 for p in parts):
            raise ValueError("must be a comma-separated list of positive integers, e.g. '200,100'")
        if max(int(p) for p in parts) > MAX_HIDDEN_WIDTH:
            raise ValueError(f"each width must be at most {MAX_HIDDEN_WIDTH}")
        return ",".join(parts)

    @model_validator(mode="after")
    def _natural_id_names_its_column(self) -> "RunConfig":
        if self.partitioner == "natural-id" and not self.partition_by:
            raise ValueError("partitioner 'natural-id' needs 'partition-by', the id column to split by")
        return self

    @model_validator(mode="after")
    def _model_takes_the_offline_inputs(self) -> "RunConfig":
        # A named data set's shape is known once it is loaded: build_model checks it then.
        from task.data import OFFLINE_SPECS  # task.data imports this module

        spec = OFFLINE_SPECS.get(self.dataset)
        if spec is None:
            return self
        rank = len(spec.input_shape)
        ranks, inputs = MODEL_INPUTS.get(self.model, ((rank,), ""))
        if rank not in ranks:
            fitting = [m for m in ModelName.__args__ if rank in MODEL_INPUTS.get(m, ((rank,),))[0]]
            raise ValueError(
                f"model '{self.model}' needs {inputs} but dataset '{self.dataset}' has inputs of "
                f"shape {spec.input_shape}: use model " + " or ".join(f"'{m}'" for m in fitting)
            )
        return self

    @model_validator(mode="after")
    def _validation_split_is_offline(self) -> "RunConfig":
        from task.data import OFFLINE_SOURCES  # task.data imports this module

        if self.server_val_fraction > 0 and self.dataset not in OFFLINE_SOURCES:
            raise ValueError(
                f"'server-val-fraction' applies to the offline data sets {OFFLINE_SOURCES}, "
                f"not '{self.dataset}'"
            )
        return self

    @model_validator(mode="after")
    def _optimizer_fits_the_method(self) -> "RunConfig":
        method = METHODS[self.strategy]
        if method.allows(self.optimizer, self.posterior):
            return self
        needed = " or ".join(f"'{o}'" for o in method.optimizers[self.posterior])
        raise ValueError(
            f"strategy '{self.strategy}' with posterior '{self.posterior}' needs optimizer "
            f"{needed}, got '{self.optimizer}'"
        )

    @model_validator(mode="after")
    def _robust_settings_fit_the_strategy(self) -> "RunConfig":
        if self.strategy == "bayes-admm":
            for key, value, fits in (
                ("aggregation", self.aggregation, ("mean", "multi-krum")),
                ("max-client-weight", self.max_client_weight, (1.0,)),
                ("clip-norm", self.clip_norm, (0.0,)),
            ):
                if value not in fits:
                    raise ValueError(
                        f"'{key}' = {value!r} applies to fedavg and fedpa; bayes-admm bounds "
                        "replies with precision-ratio-bound, precision-min/max, mean-shift-bound "
                        "and takes aggregation 'mean' or 'multi-krum'"
                    )
        if 0 < self.precision_ratio_bound < 1:
            raise ValueError("'precision-ratio-bound' must be 0 (off) or at least 1")
        if self.precision_min >= self.precision_max:
            raise ValueError("'precision-min' must be smaller than 'precision-max'")
        if self.strategy == "bayes-admm" and not (
            self.precision_min <= self.prior_precision <= self.precision_max
        ):
            raise ValueError(
                f"'prior-precision' = {self.prior_precision} lies outside [precision-min, "
                f"precision-max] = [{self.precision_min}, {self.precision_max}]"
            )
        if self.clip_norm_adaptive and self.clip_norm == 0:
            raise ValueError("'clip-norm-adaptive' needs 'clip-norm' > 0 as its starting norm")
        n, f = self.min_train_nodes, self.krum_byzantine
        if self.aggregation == "trimmed-mean" and int(self.trim_fraction * n) < 1:
            need = "'trim-fraction' > 0" if self.trim_fraction == 0 else (
                f"'min-train-nodes' >= {math.ceil(1 / self.trim_fraction)}"
            )
            raise ValueError(
                f"aggregation 'trimmed-mean' with trim-fraction {self.trim_fraction} and "
                f"min-train-nodes {n} may trim no reply: it needs {need}"
            )
        if self.aggregation == "median" and n < 3:
            raise ValueError(f"aggregation 'median' needs min-train-nodes >= 3, got {n}")
        if self.aggregation in ("krum", "multi-krum") and n < 2 * f + 3:
            raise ValueError(
                f"aggregation '{self.aggregation}' with krum-byzantine = {f} needs "
                f"min-train-nodes >= 2f + 3 = {2 * f + 3}, got {n}"
            )
        return self

    @model_validator(mode="after")
    def _personalization_fits_the_client(self) -> "RunConfig":
        if self.personalize == "posterior" and not (
            self.strategy == "bayes-admm" and self.posterior == "diagonal"
        ):
            raise ValueError(
                "personalize 'posterior' needs a client that reports its Gaussian posterior: "
                "strategy 'bayes-admm' with posterior 'diagonal' (optimizer 'ivon')"
            )
        if self.personalize == "posterior" and self.uplink_codec != "fp32":
            raise ValueError(
                "personalize 'posterior' interpolates the local posterior as trained, before "
                f"encoding: it needs uplink-codec 'fp32', got '{self.uplink_codec}'"
            )
        if self.personalize in ("finetune", "ditto") and self.optimizer != "sgd":
            raise ValueError(
                f"personalize '{self.personalize}' trains the personal model with SGD: it needs "
                f"optimizer 'sgd', got '{self.optimizer}' (IVON clients: personalize 'posterior')"
            )
        if self.personalize != "none" and self.client_test_fraction == 0:
            raise ValueError(
                "personalize needs 'client-test-fraction' > 0: personal models are evaluated on "
                "each node's held-out split"
            )
        return self

    @property
    def personal_lambda_is_auto(self) -> bool:
        """A node picks lambda itself: `personalize = posterior` with `personal-weight = auto`."""
        return self.personalize == "posterior" and self.personal_weight == "auto"

    @model_validator(mode="after")
    def _topk_has_a_reference(self) -> "RunConfig":
        # Top-k of the weights themselves zeroes 99% of the model; it sends changes only.
        for key, codec, direction in (
            ("uplink-codec", self.uplink_codec, "uplink"),
            ("downlink-codec", self.downlink_codec, "downlink"),
        ):
            delta_already = direction == "uplink" and self.strategy == "fedpa"
            if codec == "topk" and self.codec_reference != "shift" and not delta_already:
                raise ValueError(
                    f"'{key}' = 'topk' sends the largest changes to a reference: it needs "
                    "'codec-reference' = 'shift'"
                )
        return self

    @property
    def local_lr(self) -> float:
        """The local optimizer's learning rate: `lr`, or if "auto" the method's own for the
        optimizer (`Method.auto_lr`), else the optimizer's own."""
        if self.lr != "auto":
            return self.lr
        return METHODS[self.strategy].auto_lr.get(self.optimizer, AUTO_LR[self.optimizer])

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
