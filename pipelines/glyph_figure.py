"""Draw samples of ``glyphs:1000`` (docs/figures/glyphs-samples.png) through the public API.

    python pipelines/glyph_figure.py [--out docs/figures/glyphs-samples.png]

Rows are 16 classes spread over the 1,000 (every 66th, from the digit 0), columns the first 12
training samples of each; the row label is the class's character and code point.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from kdcache.data.datasets import build_dataset

CLASSES, PER_CLASS, ROWS, COLUMNS = 1000, 12, 16, 12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/figures/glyphs-samples.png"))
    args = parser.parse_args()
    dataset = build_dataset(f"glyphs:{CLASSES}:32:{PER_CLASS}").with_inputs("uint8")
    assert dataset.class_names is not None  # glyphs name every class by its character
    figure = Figure(figsize=(COLUMNS * 0.55 + 1.2, ROWS * 0.55), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(ROWS, COLUMNS, squeeze=False)
    step = (CLASSES - 1) // (ROWS - 1)
    for row in range(ROWS):
        label = row * step
        character = dataset.class_names[label]
        for column in range(COLUMNS):
            image, _ = dataset[label * PER_CLASS + column]
            axis = axes[row, column]
            axis.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=255)
            axis.set_xticks([])
            axis.set_yticks([])
        axes[row, 0].set_ylabel(
            f"{character}  U+{ord(character):04X}", rotation=0, ha="right", va="center", fontsize=7
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
