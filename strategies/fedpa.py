"""FedPA (Federated Posterior Averaging), server half.

Clients send Delta = Sigma_hat^-1 (mu_hat - theta) itself (FedAvg's theta_last - theta during
burn-in rounds); the server step is FedAvg's: the example-weighted mean of the deltas fed to
SGD with momentum (`strategies.fedavg.aggregate_round`). The client half is
`client_app/fedpa.py`.
"""

from __future__ import annotations

from flwr.app import ArrayRecord

from strategies.fedavg import Arrays, FedAvg
from task.params import decode_array


class FedPA(FedAvg):
    def client_delta(self, arrays: ArrayRecord) -> Arrays:
        return [decode_array(arrays[k]) for k in self.keys]
