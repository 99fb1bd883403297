"""Figures for runs, sweeps and stores: what people would rather look at than read.

Every figure is drawn on a :class:`matplotlib.figure.Figure` bound to the non-interactive Agg
canvas, never through pyplot, so no global backend is switched and no window can open.
matplotlib is imported inside the functions so that ``import kdcache`` stays light. Figures are
written atomically (a temporary file, then a rename), like checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import textwrap
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from kdcache.errors import ConfigError, KdcacheError
from kdcache.temporaries import TemporaryFile
from kdcache.wording import counted

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from kdcache.store.read.reader import StoreReader

#: Suffixes a figure path may end with; matplotlib picks the format from it.
FIGURE_FORMATS = ("png", "pdf", "svg")
#: Rows of a store decoded at a time when summarising it, to bound memory on big stores.
STORE_BLOCK_ROWS = 1 << 16
#: Classes drawn per sample in the distributions figure: the teacher's most likely ones.
MAX_CLASSES_SHOWN = 10
#: Characters of a figure title per inch of figure width, so that a long store path wraps
#: instead of running off the canvas.
TITLE_CHARS_PER_INCH = 11


def new_figure(*, width: float, height: float) -> Figure:
    """A constrained-layout figure on the Agg canvas (no pyplot, no window)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: str | os.PathLike[str]) -> Path:
    """Write ``figure`` atomically to ``path``; the suffix picks the format."""
    target = Path(path)
    fmt = target.suffix.lower().lstrip(".")
    if fmt not in FIGURE_FORMATS:
        raise ConfigError(
            f"cannot tell the figure format of {os.fspath(path)!r}; end the file name with "
            + ", ".join(f".{f}" for f in FIGURE_FORMATS)
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with TemporaryFile.create(
            target.with_name(target.name + ".tmp"), purpose=f"the figure {target.name}"
        ) as temporary:
            figure.savefig(temporary.stream, format=fmt, dpi=100)
            temporary.publish(target)
    except KdcacheError:
        raise
    except OSError as error:
        raise KdcacheError(
            f"cannot write figure {target}: {error.strerror}; choose a writable path"
        ) from None
    return target


def set_title(figure: Figure, *lines: str) -> None:
    """The figure's title, each line wrapped to the figure's width (a path breaks at slashes)."""
    width = max(20, int(figure.get_figwidth() * TITLE_CHARS_PER_INCH))
    wrapped = [
        textwrap.fill(line.replace("/", "/\u200b"), width).replace("\u200b", "") for line in lines
    ]
    figure.suptitle("\n".join(wrapped), fontsize="medium")


def mark_best(axes: Axes, x: float, y: float, label: str) -> None:
    """A star on the best point, named in the legend (which matplotlib keeps off the data)."""
    axes.plot([x], [y], "*", ms=13, color="gold", markeredgecolor="black", zorder=5, label=label)


def draw_references(axes: Axes, references: Mapping[str, float] | None) -> None:
    """A dashed horizontal line per reference accuracy (a teacher, a CE-only student), named in
    the legend with its value."""
    for (name, value), color in zip(
        (references or {}).items(), ("black", "tab:red", "tab:gray"), strict=False
    ):
        axes.axhline(value, color=color, lw=1, ls="--", label=f"{name}: {value:.2f}%")


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl``, one per evaluation (an unfinished last line is
    dropped): each epoch's end, and within epochs those of ``--eval-every``, which carry their
    ``epoch_progress`` (see :func:`epoch_position`)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a run killed mid-write leaves a torn last line
    return records


def epoch_position(record: dict[str, Any]) -> float:
    """Where a ``metrics.jsonl`` record falls, in epochs: its ``epoch`` at an epoch's end, its
    fractional ``epoch_progress`` within one."""
    return float(record.get("epoch_progress", record["epoch"]))


def plot_curves(
    metrics: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    title: str = "",
    references: Mapping[str, float] | None = None,
) -> Path:
    """Training/validation loss and validation accuracy per epoch, from a ``metrics.jsonl``.

    The best epoch is starred; ``references`` (name -> accuracy in percent, e.g. the teacher's
    or a CE-only student's) are drawn as dashed lines on the accuracy panel.
    """
    records = read_metrics(metrics)
    epochs = [epoch_position(r) for r in records]
    figure = new_figure(width=9, height=3.4)
    loss_axes, acc_axes = figure.subplots(1, 2)
    loss_axes.plot(
        epochs, [r["train_loss"] for r in records], marker="o", ms=3, label="train (objective)"
    )
    loss_axes.plot(
        epochs,
        [r["val_loss"] for r in records],
        marker="o",
        ms=3,
        label="validation (cross-entropy)",
    )
    loss_axes.set(xlabel="epoch", ylabel="loss", title="loss")
    loss_axes.legend(fontsize="small")
    accuracy = [r["val_acc"] for r in records]
    acc_axes.plot(epochs, accuracy, marker="o", ms=3, color="tab:green")
    if records:
        best = int(np.argmax(accuracy))
        mark_best(
            acc_axes,
            epochs[best],
            accuracy[best],
            f"best {accuracy[best]:.2f}% (epoch {epochs[best]:g})",
        )
    draw_references(acc_axes, references)
    acc_axes.margins(y=0.12)  # room for the star at the top of the curve
    acc_axes.set(xlabel="epoch", ylabel="accuracy (%)", title="validation accuracy")
    acc_axes.legend(fontsize="small", loc="best")
    for axes in (loss_axes, acc_axes):
        axes.grid(alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
    if title:
        set_title(figure, title)
    return save_figure(figure, path)


def plot_distributions(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    labels: Sequence[int] | torch.Tensor,
    path: str | os.PathLike[str],
    *,
    temperature: float,
    sample_ids: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Per sample: the teacher's probabilities at T, the student's at T and at T=1, the hard label.

    One panel per row of the ``(K, C)`` logits. With many classes only the teacher's
    :data:`MAX_CLASSES_SHOWN` most likely ones, plus the label, are drawn. ``class_names`` (an
    image folder's) name the classes.
    """

    def named(c: int) -> str:
        return str(c) if class_names is None else class_names[c]

    teacher_t = F.softmax(teacher_logits.float() / temperature, dim=1)
    student_t = F.softmax(student_logits.float() / temperature, dim=1)
    student_1 = F.softmax(student_logits.float(), dim=1)
    hard_labels = [int(y) for y in labels]
    ids = list(sample_ids) if sample_ids is not None else list(range(len(hard_labels)))
    figure = new_figure(width=9, height=2.3 * len(hard_labels))
    axes_list = figure.subplots(len(hard_labels), 1, squeeze=False).ravel()
    for row, axes in enumerate(axes_list):
        label = hard_labels[row]
        order = torch.argsort(teacher_t[row], descending=True)[:MAX_CLASSES_SHOWN].tolist()
        # A negative label is a sample without one (an unlabeled transfer set): nothing to mark.
        classes = order if label in order or label < 0 else [*order[:-1], label]
        x = np.arange(len(classes))
        width = 0.27
        for offset, (probs, name) in enumerate(
            (
                (teacher_t, f"teacher, T={temperature:g}"),
                (student_t, f"student, T={temperature:g}"),
                (student_1, "student, T=1"),
            )
        ):
            axes.bar(x + (offset - 1) * width, probs[row, classes].numpy(), width, label=name)
        if label >= 0:
            hard = classes.index(label)
            axes.axvspan(
                hard - 1.5 * width,
                hard + 1.5 * width,
                color="gold",
                alpha=0.3,
                zorder=0,
                label="hard label",
            )
        axes.set_xticks(x, [named(c) for c in classes])
        title = f"sample {ids[row]} ({f'label {named(label)}' if label >= 0 else 'unlabeled'})"
        axes.set(ylim=(0, 1.05), ylabel="probability", title=title)
        axes.grid(axis="y", alpha=0.3)
    axes_list[0].legend(fontsize="small", ncols=4, loc="upper right")
    axes_list[-1].set_xlabel("class (teacher's most likely first)")
    return save_figure(figure, path)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    # Sample standard deviation over seeds; a single seed has no spread to show.
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def plot_sweep(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    title: str = "",
    references: Mapping[str, float] | None = None,
) -> Path:
    """Best and final validation accuracy against temperature, one line per (loss, alpha).

    ``rows`` are per-run records with ``loss``, ``alpha``, ``temperature``, ``best_val_acc`` and
    ``final_val_acc``; points are the mean over seeds, error bars one standard deviation. Each
    panel stars its best setting; ``references`` (name -> accuracy in percent) are dashed lines.
    """
    groups: dict[tuple[str, float], dict[float, list[Mapping[str, Any]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for row in rows:
        groups[(row["loss"], float(row["alpha"]))][float(row["temperature"])].append(row)
    temperatures = sorted({float(row["temperature"]) for row in rows})
    figure = new_figure(width=10, height=3.8)
    for axes, key, name in zip(
        figure.subplots(1, 2), ("best_val_acc", "final_val_acc"), ("best", "final"), strict=False
    ):
        best: tuple[float, float, str] | None = None
        for (loss, alpha), by_temperature in sorted(groups.items()):
            xs = sorted(by_temperature)
            stats = [_mean_std([float(r[key]) for r in by_temperature[t]]) for t in xs]
            for t, (mean, _) in zip(xs, stats, strict=True):
                if best is None or mean > best[1]:
                    best = (t, mean, f"best: {loss}, alpha={alpha:g}, T={t:g}: {mean:.2f}%")
            axes.errorbar(
                xs,
                [m for m, _ in stats],
                yerr=[s for _, s in stats],
                marker="o",
                ms=4,
                capsize=3,
                label=f"{loss}, alpha={alpha:g}",
            )
        if temperatures and temperatures[-1] / temperatures[0] > 4:
            axes.set_xscale("log", base=2)
        axes.set_xticks(temperatures, [f"{t:g}" for t in temperatures])
        axes.set(
            xlabel="temperature T",
            ylabel="validation accuracy (%)",
            title=f"{name} validation accuracy (mean ± std over seeds)",
        )
        if best is not None:
            mark_best(axes, *best)
        draw_references(axes, references)
        axes.margins(y=0.12)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small", loc="best")
    if title:
        set_title(figure, title)
    return save_figure(figure, path)


def _store_summary(
    reader: StoreReader, temperatures: Sequence[float]
) -> tuple[dict[float, np.ndarray], dict[float, np.ndarray], np.ndarray]:
    """Per-row max probability and entropy at each temperature, and the teacher's argmax (every
    view of every sample in a store with views)."""
    max_prob: dict[float, list[np.ndarray]] = {t: [] for t in temperatures}
    entropy: dict[float, list[np.ndarray]] = {t: [] for t in temperatures}
    predicted = []
    num_rows = reader.metadata.num_rows
    for start in range(0, num_rows, STORE_BLOCK_ROWS):
        rows = np.arange(start, min(start + STORE_BLOCK_ROWS, num_rows))
        predicted.append(reader.read_dense(rows, temperature=1.0).argmax(dim=1).numpy())
        for t in temperatures:
            # Read at each T: a top-k store fills its tail for the temperature it is softened at.
            log_p = F.log_softmax(reader.read_dense(rows, temperature=t) / t, dim=1)
            max_prob[t].append(log_p.max(dim=1).values.exp().numpy())
            entropy[t].append(-(log_p.exp() * log_p).sum(dim=1).numpy())
    return _joined(max_prob), _joined(entropy), np.concatenate(predicted)


def _joined(parts: dict[float, list[np.ndarray]]) -> dict[float, np.ndarray]:
    return {t: np.concatenate(blocks) for t, blocks in parts.items()}


def _per_class_accuracy(
    axes: Axes,
    predicted: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    split: str,
    names: Sequence[str] | None = None,
) -> None:
    counts = np.bincount(labels, minlength=num_classes)
    hits = np.bincount(labels[predicted == labels], minlength=num_classes)
    accuracy = 100.0 * hits / np.maximum(counts, 1)
    overall = 100.0 * hits.sum() / max(counts.sum(), 1)
    # Dots, not bars, so the axis can zoom on a good teacher's 95-100% without misleading.
    if num_classes <= 50:
        axes.plot(np.arange(num_classes), accuracy, "o", color="tab:purple")
        axes.set(xlabel="class", xticks=np.arange(num_classes) if num_classes <= 20 else [])
        if names is not None and num_classes <= 20:
            axes.set_xticklabels(names, rotation=45, ha="right", fontsize="small")
    else:  # too many classes to tell apart: the sorted per-class curve reads better
        axes.plot(np.sort(accuracy), color="tab:purple")
        axes.set(xlabel="classes, sorted by accuracy")
    # Named in the title rather than a legend, which would hide dots near 100%.
    axes.axhline(overall, color="black", lw=1, ls="--")
    low = max(0.0, math.floor(float(accuracy[counts > 0].min(initial=100.0)) - 2))
    axes.set(
        ylabel="teacher accuracy (%)",
        title=f"per-class teacher accuracy ({split} split)\ndashed: overall {overall:.2f}%",
        ylim=(low, 100.5),
    )
    axes.grid(alpha=0.3)


def plot_store(
    reader: StoreReader, path: str | os.PathLike[str], *, temperatures: Sequence[float] = (1.0, 4.0)
) -> Path:
    """Histograms of the teacher's max probability and entropy at each temperature, and its
    per-class accuracy against the labels stored with the logits (a store without labels has
    no such panel)."""
    max_prob, entropy, predicted = _store_summary(reader, temperatures)
    max_entropy = max(
        math.log(reader.num_classes), 1e-3
    )  # one class: zero entropy, still a valid range
    labels = reader.labels
    figure = new_figure(width=13 if labels is not None else 9, height=3.6)
    prob_axes, entropy_axes, *class_axes = figure.subplots(1, 3 if labels is not None else 2)
    for t in temperatures:
        prob_axes.hist(max_prob[t], bins=40, range=(0, 1), alpha=0.6, label=f"T={t:g}")
        entropy_axes.hist(entropy[t], bins=40, range=(0, max_entropy), alpha=0.6, label=f"T={t:g}")
    prob_axes.set(xlabel="max class probability", ylabel="samples", title="teacher confidence")
    entropy_axes.set(
        xlabel=f"entropy (nats, max ln {reader.num_classes} = {math.log(reader.num_classes):.2f})",
        ylabel="samples",
        title="teacher entropy",
    )
    for axes in (prob_axes, entropy_axes):
        axes.legend(fontsize="small")
        axes.grid(alpha=0.3)
    split = (reader.metadata.dataset or {}).get("split", "stored")
    if labels is not None:
        labels = np.repeat(labels, reader.metadata.views)  # one per row: each view of a sample
        _per_class_accuracy(
            class_axes[0], predicted, labels, reader.num_classes, split, reader.class_names
        )
    teacher = (reader.metadata.teacher or {}).get("spec", "unknown teacher")
    set_title(
        figure,
        reader.where,
        f"{counted(reader.num_samples, 'sample')}"
        + (f" x {counted(reader.metadata.views, 'view')}" if reader.metadata.views > 1 else "")
        + f", {counted(reader.num_classes, 'class', 'classes')}, {reader.metadata.encoding}, "
        f"teacher {teacher}" + ("" if labels is not None else "; no labels stored"),
    )
    return save_figure(figure, path)
