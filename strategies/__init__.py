"""Server strategies; `STRATEGIES` maps a config name to its class, as `task.methods` registers it."""

from strategies.base import FederatedStrategy
from task.methods import METHODS, resolve

STRATEGIES: dict[str, type[FederatedStrategy]] = {name: resolve(m.server) for name, m in METHODS.items()}
