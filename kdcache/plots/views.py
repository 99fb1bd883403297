"""The figure of a store's views: a few samples' recreated views, each with the teacher's top
classes on it (``kdcache inspect STORE --plot``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from kdcache.augment.recipe import parse_recipe
from kdcache.augment.views import BaseDataset, ViewSource
from kdcache.errors import StoreMismatchError
from kdcache.plots.figures import new_figure, save_figure

if TYPE_CHECKING:
    from kdcache.store.read.reader import StoreReader

#: Teacher classes written above each view.
TOP_CLASSES = 2


def _image(view: torch.Tensor) -> np.ndarray:
    """An (H, W) or (H, W, 3) array in [0, 1] for imshow, whatever the dataset's normalisation."""
    values = view.detach().float()
    low, high = values.min(), values.max()
    values = (values - low) / (high - low) if high > low else torch.zeros_like(values)
    return values[0].numpy() if values.shape[0] == 1 else values[:3].permute(1, 2, 0).numpy()


def plot_views(
    reader: StoreReader,
    dataset: BaseDataset,
    path: str | os.PathLike[str],
    *,
    samples: int = 4,
    max_views: int = 6,
) -> Path:
    """Draw up to ``max_views`` views of ``samples`` evenly spaced samples of ``dataset`` (the
    one the store was dumped from), each titled with the teacher's top classes (T = 1)."""

    record = reader.metadata.augment
    if record is None or reader.view_params is None:
        raise StoreMismatchError(
            f"{reader.where} holds no augmented views to draw; it was dumped without --augment"
        )
    source = ViewSource(dataset, parse_recipe(record["recipe"]), reader.view_params)
    chosen = np.linspace(0, len(dataset) - 1, min(samples, len(dataset))).round().astype(int)
    shown = min(max_views, reader.views)
    logits, _ = reader.read_views(chosen, temperature=1.0)  # probabilities at T = 1
    probs = torch.softmax(logits, dim=-1)
    figure = new_figure(width=1.9 * (shown + 1), height=2.1 * len(chosen))
    grid = figure.subplots(len(chosen), shown + 1, squeeze=False)
    for row, sample in enumerate(chosen.tolist()):
        clean, label = dataset[sample]
        grid[row, 0].imshow(_image(clean), cmap="gray")
        grid[row, 0].set_title(f"sample {sample}\nlabel {label} (clean)", fontsize="small")
        for view in range(shown):
            axes = grid[row, view + 1]
            axes.imshow(_image(source.view(sample, view, clean)), cmap="gray")
            top = probs[row, view].topk(min(TOP_CLASSES, reader.num_classes))
            text = ", ".join(
                f"{c}: {p:.2f}"
                for p, c in zip(top.values.tolist(), top.indices.tolist(), strict=True)
            )
            axes.set_title(f"view {view}\n{text}", fontsize="small")
    for axes in grid.flat:
        axes.set_xticks([])
        axes.set_yticks([])
    figure.suptitle(f"{reader.where}: views of {record['recipe']} (teacher's top classes, T=1)")
    return save_figure(figure, path)
