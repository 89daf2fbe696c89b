"""The PNG plots' shared start and end: a figure on the file-only Agg backend, then its title,
layout, file and release."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def new_figure(ncols: int, figsize: tuple[float, float], **subplots: Any) -> tuple[Any, Any]:
    """(figure, axes) of one row of `ncols` plots, drawn without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=figsize, **subplots)


def save_figure(fig: Any, path: Path, title: str) -> None:
    """Title the figure, lay it out, write it to `path` and free it."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
