"""The language-model run figure: losses and held-out perplexity per epoch."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from kdcache.plots.figures import (
    epoch_position,
    mark_best,
    new_figure,
    read_metrics,
    save_figure,
    set_title,
)


def plot_lm_curves(
    metrics: str | os.PathLike[str], path: str | os.PathLike[str], *, title: str = ""
) -> Path:
    """Training objective and held-out cross-entropy, and held-out perplexity, per epoch."""
    records = read_metrics(metrics)
    epochs = [epoch_position(r) for r in records]
    figure = new_figure(width=9, height=3.4)
    loss_axes, ppl_axes = figure.subplots(1, 2)
    loss_axes.plot(
        epochs, [r["train_loss"] for r in records], marker="o", ms=3, label="train (objective)"
    )
    loss_axes.plot(
        epochs, [r["val_loss"] for r in records], marker="o", ms=3, label="held out (CE)"
    )
    loss_axes.set(xlabel="epoch", ylabel="nats per token", title="loss")
    loss_axes.legend(fontsize="small")
    perplexity = [r["val_ppl"] for r in records]
    ppl_axes.plot(epochs, perplexity, marker="o", ms=3, color="tab:green")
    if records:
        best = int(np.argmin(perplexity))
        mark_best(
            ppl_axes,
            epochs[best],
            perplexity[best],
            f"best {perplexity[best]:.2f} (epoch {epochs[best]:g})",
        )
        ppl_axes.legend(fontsize="small", loc="best")
    ppl_axes.margins(y=0.12)  # room for the star at either end of the curve
    ppl_axes.set(xlabel="epoch", ylabel="perplexity", title="held-out perplexity")
    for axes in (loss_axes, ppl_axes):
        axes.grid(alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
    if title:
        set_title(figure, title)
    return save_figure(figure, path)
