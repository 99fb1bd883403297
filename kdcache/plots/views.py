"""The figure of a store's views: a few samples' recreated views, each with the teacher's top
classes on it and, for a mixing recipe, the share of the sample's own pixels and its partner
(``kdcache inspect STORE --plot``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from kdcache.augment.views import BaseDataset, ViewSource, recorded_recipe
from kdcache.errors import StoreMismatchError
from kdcache.plots.figures import new_figure, save_figure, set_title

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
    one the store was dumped from), each titled with the teacher's top classes (T = 1) and, when
    the recipe mixes, lambda (the share of the sample's own pixels) and the partner sample."""

    record = reader.metadata.augment
    if record is None or reader.view_params is None:
        raise StoreMismatchError(
            f"{reader.where} holds no augmented views to draw; it was dumped without --augment"
        )
    recipe = recorded_recipe(record, where=reader.where)
    source = ViewSource(
        dataset, recipe, reader.view_params, described=f"{reader.where}'s view_params"
    )
    labels = getattr(dataset, "labels", None)
    chosen = np.linspace(0, len(dataset) - 1, min(samples, len(dataset))).round().astype(int)
    shown = min(max_views, reader.views)
    logits, _ = reader.read_views(chosen, temperature=1.0)  # probabilities at T = 1
    probs = torch.softmax(logits, dim=-1)
    figure = new_figure(
        width=1.9 * (shown + 1), height=(2.5 if recipe.mixes else 2.1) * len(chosen)
    )
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
            lines = [f"view {view}", text]
            if recipe.mixes:
                values = reader.view_params[sample, view]
                partner = int(values[recipe.mix_offset])
                lines[0] += f", λ={values[recipe.mix_offset + 1]:.2f}"
                lines.insert(
                    1,
                    f"partner {partner}"
                    + ("" if labels is None else f" (label {int(labels[partner])})"),
                )
            axes.set_title("\n".join(lines), fontsize="small")
    for axes in grid.flat:
        axes.set_xticks([])
        axes.set_yticks([])
    set_title(
        figure,
        reader.where,
        f"views of {record['recipe']}, titled with the teacher's top classes at T=1"
        + ("; λ: the share of the sample's own pixels" if recipe.mixes else ""),
    )
    return save_figure(figure, path)
