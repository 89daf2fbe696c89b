"""Uncertainty a user acts on, as numbers: pure functions of predicted probabilities.

- predictive entropy H[p] of the predictive distribution p (nats);
- mutual information between the prediction and the weights (BMA): H[E_theta p] - E_theta H[p],
  the part of the entropy that comes from disagreement between weight draws (epistemic);
- out-of-distribution detection: the AUROC of an uncertainty score separating in-distribution
  inputs (negatives) from OOD inputs (positives), by scikit-learn;
- selective prediction: the model answers only the inputs it is least uncertain about; accuracy
  at a coverage (the share answered) and the area under the risk-coverage curve (AURC, Geifman
  et al. 2019: the mean, over k = 1..N, of the error rate on the k least uncertain inputs).

Ties in uncertainty are broken by input order (a stable sort), so every answer is exact and
repeatable.
"""

from __future__ import annotations

import math

import numpy as np

LOG_FLOOR = 1e-12  # probabilities are floored here inside logarithms, as in task.metrics.nll


def predictive_entropy(probs: np.ndarray) -> np.ndarray:
    """H[p] = -sum_c p_c log p_c per input (rows of `probs`), in nats."""
    probs = np.asarray(probs, dtype=np.float64)
    return -(probs * np.log(np.clip(probs, LOG_FLOOR, None))).sum(axis=-1)


def mutual_information(probs: np.ndarray, expected_entropy: np.ndarray) -> np.ndarray:
    """H[mean prediction] - mean over draws of H[draw's prediction], per input.

    `probs` is the mean of the draws' probabilities, `expected_entropy` the mean of their
    entropies. Non-negative by Jensen's inequality; rounding below 0 is clipped.
    """
    return np.maximum(predictive_entropy(probs) - np.asarray(expected_entropy, np.float64), 0.0)


def draws_mutual_information(draws: np.ndarray) -> np.ndarray:
    """Mutual information from the draws' probabilities themselves, shaped (draws, N, classes)."""
    draws = np.asarray(draws, dtype=np.float64)
    return mutual_information(draws.mean(axis=0), predictive_entropy(draws).mean(axis=0))


def ood_auroc(score_in: np.ndarray, score_out: np.ndarray) -> float:
    """AUROC of `score` (higher = more uncertain) telling OOD inputs from in-distribution ones:
    1 separates them perfectly, 0.5 is chance; NaN when a score is not finite (a diverged
    model), which results.json writes as null."""
    from sklearn.metrics import roc_auc_score

    if not (np.isfinite(score_in).all() and np.isfinite(score_out).all()):
        return math.nan
    labels = np.concatenate([np.zeros(len(score_in)), np.ones(len(score_out))])
    return float(roc_auc_score(labels, np.concatenate([score_in, score_out])))


def _risks(correct: np.ndarray, uncertainty: np.ndarray) -> np.ndarray:
    """Error rate on the k least uncertain inputs, for k = 1..N."""
    order = np.argsort(uncertainty, kind="stable")
    errors = np.cumsum(~np.asarray(correct, dtype=bool)[order])
    return errors / np.arange(1, len(order) + 1)


def selective_accuracy(correct: np.ndarray, uncertainty: np.ndarray, coverage: float) -> float:
    """Accuracy on the ceil(coverage * N) least uncertain inputs (0 < coverage <= 1)."""
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    if len(correct) == 0:
        return math.nan
    kept = max(math.ceil(coverage * len(correct) - 1e-9), 1)
    return float(1.0 - _risks(correct, uncertainty)[kept - 1])


def aurc(correct: np.ndarray, uncertainty: np.ndarray) -> float:
    """Area under the risk-coverage curve: the mean error rate over coverages k / N, k = 1..N
    (lower is better; a perfect ranking gives the smallest value the errors allow)."""
    if len(correct) == 0:
        return math.nan
    return float(_risks(correct, uncertainty).mean())


def entropy_threshold(quantiles: np.ndarray, coverage: float) -> float:
    """The entropy below which a share `coverage` of inputs fell, from the entropy's quantiles at
    coverages 0, 1/(Q-1), ..., 1 (linear between them)."""
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    quantiles = np.asarray(quantiles, dtype=np.float64)
    return float(np.interp(coverage, np.linspace(0.0, 1.0, len(quantiles)), quantiles))
