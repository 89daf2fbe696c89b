"""Out-of-distribution inputs and covariate shift, built offline from the server's test set.

Each data set has one small builder (OOD_BUILDERS) that takes the test inputs as the model sees
them and returns named OOD sets of the same shape: transforms act in the data's raw space and
the training preprocessing is applied after, so an OOD input differs from a test input only by
the transform. A data set without a builder of its own gets uniform noise over the test inputs'
per-feature range. Everything is seeded: the same test set and seed give the same arrays.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

DIGITS_MAX = 16.0  # sklearn's digits: 8x8 images of 0..16 counts, scaled by 1/16 for training
MNIST1D_LENGTH = 40
# Covariate shift: Gaussian noise added to the test inputs, its standard deviation this many
# times the test inputs' own (over all values), so the levels mean the same on any data set.
SHIFT_LEVELS = (0.25, 0.5, 1.0)

OodSets = dict[str, np.ndarray]


def digits_ood(x: np.ndarray, rng: np.random.Generator) -> OodSets:
    """Uniform noise over 0..16, inverted (16 - v) and rotated (90 degrees) digits."""
    raw = x.reshape(-1, 8, 8).astype(np.float64) * DIGITS_MAX

    def scaled(images: np.ndarray) -> np.ndarray:
        return (images / DIGITS_MAX).astype(np.float32).reshape(x.shape)

    return {
        "noise": scaled(rng.uniform(0.0, DIGITS_MAX, raw.shape)),
        "inverted": scaled(DIGITS_MAX - raw),
        "rotated": scaled(np.rot90(raw, k=1, axes=(1, 2))),
    }


def mnist1d_ood(x: np.ndarray, rng: np.random.Generator) -> OodSets:
    """Time-reversed signals, signals with their time steps shuffled (each its own order) and
    Gaussian noise with the test signals' mean and standard deviation. Each transform commutes
    with an affine scaling of the values, so it acts on the signals as the model sees them."""
    signals = x.reshape(-1, MNIST1D_LENGTH)
    order = rng.permuted(np.tile(np.arange(MNIST1D_LENGTH), (len(signals), 1)), axis=1)
    shuffled = np.take_along_axis(signals, order, axis=1)
    noise = rng.normal(signals.mean(), signals.std(), signals.shape)
    return {
        "reversed": signals[:, ::-1].reshape(x.shape).astype(np.float32),
        "shuffled": shuffled.reshape(x.shape).astype(np.float32),
        "noise": noise.reshape(x.shape).astype(np.float32),
    }


def noise_ood(x: np.ndarray, rng: np.random.Generator) -> OodSets:
    """Uniform noise over each feature's range in the test inputs."""
    flat = x.reshape(len(x), -1)
    noise = rng.uniform(flat.min(axis=0), flat.max(axis=0), flat.shape)
    return {"noise": noise.reshape(x.shape).astype(np.float32)}


OOD_BUILDERS: dict[str, Callable[[np.ndarray, np.random.Generator], OodSets]] = {
    "digits": digits_ood,
    "mnist1d": mnist1d_ood,
    "synthetic": noise_ood,
}


def ood_sets(dataset: str, x: np.ndarray, seed: int) -> OodSets:
    """The OOD sets of `dataset`, built from its test inputs `x` (as the model takes them)."""
    builder = OOD_BUILDERS.get(dataset, noise_ood)
    return builder(np.asarray(x), np.random.default_rng([seed, 1]))


def shifted_sets(x: np.ndarray, seed: int, levels: tuple[float, ...] = SHIFT_LEVELS) -> OodSets:
    """The test inputs plus Gaussian noise of each level (times their standard deviation),
    keyed by the level; one noise draw, scaled, so the levels differ only in its size."""
    noise = np.random.default_rng([seed, 2]).standard_normal(x.shape) * float(np.std(x))
    return {f"{level:g}": (x + level * noise).astype(np.float32) for level in levels}
