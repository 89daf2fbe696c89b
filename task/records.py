"""Names of the records exchanged between the ServerApp and the ClientApp (both sides use these)."""

ARRAYS = "arrays"  # model parameters (FedAvg weights, a posterior mean) or a FedPA delta
CONFIG = "config"  # per-round settings sent down (server-round, lr, ...)
METRICS = "metrics"  # per-reply metrics sent up, always with NUM_EXAMPLES
NUM_EXAMPLES = "num-examples"
SERVER_ROUND = "server-round"
FINISH_ACTION = "finish"  # query action sent to every node when the run ends
PRECISION = "precision"  # BayesADMM: a diagonal Gaussian's precision, same keys as ARRAYS
AT_PRIOR = "at-prior"  # BayesADMM: the server global is still the prior (no update applied yet)
ACCEPTED_ROUND = "accepted-round"  # BayesADMM: last round whose reply from this node was used
STATE_KEY = "state-key"  # names the clients' lasting state; kept when a run is resumed
CLIENT_STATE_DIR = "client-state-dir"  # where simulated nodes on the server's machine keep state
CLIENT_STATE_FOLDER = "client-state"  # its name: <output-dir>/client-state/partition-<id>/
CLIENT_ID = "client-id"  # BayesADMM reply: the node's identity that outlives a Flower run
# BayesADMM, first message to a node whose client-id this run has not seen (after a resume, when
# a new Flower run gave the nodes new ids): the resumed run's accepted round per client-id.
ACCEPTED_CLIENTS = "accepted-clients"
ACCEPTED_ROUNDS = "accepted-rounds"
# A train or evaluate message whose arrays are compressed (task/compression.py): the round of the
# global it is a difference to (codec-reference "shift"), 0 for none (every evaluate message);
# absent: the arrays are the model's.
DOWNLINK_REFERENCE = "downlink-reference-round"
