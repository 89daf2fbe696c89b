"""Models, built by one constructor that the server and every client share.

No model has buffers (no BatchNorm running statistics): every entry of the state dict is a
trainable parameter, so "the global model" and "the parameter vector" are the same thing.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from task.config import ConfigError, RunConfig
from task.data import DataSpec

ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


def seed_torch(seed: int) -> None:
    """Seed torch's CPU generator, and CUDA's where there is one.

    Not `torch.manual_seed`: that also queues a seeding for every accelerator backend the build
    knows, each capturing a stack trace, even on a CPU-only torch (milliseconds per call deep in
    Flower's stack, paid on every message).
    """
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def build_model(cfg: RunConfig, spec: DataSpec) -> nn.Module:
    """The model named by `cfg.model`, initialised deterministically from `cfg.seed`."""
    seed_torch(cfg.seed)
    return _architecture(cfg, spec)


def _architecture(cfg: RunConfig, spec: DataSpec) -> nn.Module:
    in_features = math.prod(spec.input_shape)
    activation = ACTIVATIONS[cfg.activation]
    if cfg.model == "logreg":
        return nn.Sequential(nn.Flatten(), nn.Linear(in_features, spec.num_classes))
    if cfg.model == "mlp":
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for hidden in cfg.hidden_sizes:
            layers += [nn.Linear(width, hidden), activation()]
            width = hidden
        layers.append(nn.Linear(width, spec.num_classes))
        return nn.Sequential(*layers)
    if cfg.model == "cnn1d":
        return _cnn1d(spec, activation)
    return _cnn(spec, activation)


def _cnn(spec: DataSpec, activation: type[nn.Module]) -> nn.Module:
    """Two 5x5 conv layers of 64 channels with 2x2 pooling, then FC 384 and FC 192.

    The shape of Acar et al.'s CIFAR-10 network, used for 1x28x28 and 3x32x32 images alike
    (and any other C x H x W input: padding keeps small images such as 1x8x8 valid).
    """
    if len(spec.input_shape) != 3:
        raise ConfigError(
            f"model 'cnn' needs image inputs (C, H, W); this data set has shape {spec.input_shape}"
        )
    channels, height, width = spec.input_shape
    pooled = (height // 4) * (width // 4)
    if pooled == 0:
        raise ConfigError(f"model 'cnn' needs images of at least 4x4, got {height}x{width}")
    return nn.Sequential(
        nn.Conv2d(channels, 64, 5, padding=2),
        activation(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 5, padding=2),
        activation(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * pooled, 384),
        activation(),
        nn.Linear(384, 192),
        activation(),
        nn.Linear(192, spec.num_classes),
    )


CNN1D_CHANNELS = 25
CNN1D_LAYERS = ((5, 2, 1), (3, 2, 1), (3, 2, 1))  # kernel, stride, padding of each conv layer


def _cnn1d(spec: DataSpec, activation: type[nn.Module]) -> nn.Module:
    """MNIST-1D's reference CNN (Greydanus 2020, `ConvBase`): three 1-D conv layers of 25
    channels (kernels 5, 3, 3, each stride 2), then one linear layer: 5,210 parameters on
    MNIST-1D's length-40 signals.

    Takes signals of shape (L) (one channel) or (C, L); the model restores the shape itself, so
    flat node data (`N x L`) needs no reshaping.
    """
    if len(spec.input_shape) not in (1, 2):
        raise ConfigError(
            f"model 'cnn1d' needs 1-D signals (L) or (C, L); this data set has shape "
            f"{spec.input_shape}"
        )
    channels, length = spec.input_shape if len(spec.input_shape) == 2 else (1, *spec.input_shape)
    layers: list[nn.Module] = [nn.Flatten(), nn.Unflatten(1, (channels, length))]
    width = length
    for kernel, stride, padding in CNN1D_LAYERS:
        layers += [nn.Conv1d(channels, CNN1D_CHANNELS, kernel, stride, padding), activation()]
        channels, width = CNN1D_CHANNELS, (width + 2 * padding - kernel) // stride + 1
        if width < 1:
            raise ConfigError(
                f"model 'cnn1d': signals of length {length} are too short for its "
                f"{len(CNN1D_LAYERS)} conv layers"
            )
    layers += [nn.Flatten(), nn.Linear(CNN1D_CHANNELS * width, spec.num_classes)]
    return nn.Sequential(*layers)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run config: device = 'cuda' but no CUDA device is available here")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
