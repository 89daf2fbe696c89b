"""Server strategies; `STRATEGIES` is the one place that maps a config name to a class."""

from strategies.base import FederatedStrategy
from strategies.bayes_admm import BayesADMM
from strategies.fedavg import FedAvg
from strategies.fedpa import FedPA

STRATEGIES: dict[str, type[FederatedStrategy]] = {"fedavg": FedAvg, "fedpa": FedPA, "bayes-admm": BayesADMM}
