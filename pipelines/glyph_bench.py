"""Time drawing ``glyphs:CLASSES:SIZE:PER_CLASS`` from an empty cache, then loading it back.

    python pipelines/glyph_bench.py [--spec glyphs:1000:32:100]

Prints wall and CPU seconds of each phase: choosing the classes, drawing the training split and
writing it to the cache (one ``build_dataset`` from an empty cache folder), and building it again
in a fresh process state from the cache.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from typing import TypeVar

from kdcache.data.datasets import build_dataset, glyph_render, glyphs

T = TypeVar("T")


def _timed(label: str, work: Callable[[], T]) -> T:
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"{label}: {wall:.1f} s wall, {cpu:.1f} s CPU")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="glyphs:1000:32:100")
    args = parser.parse_args()
    classes = int(args.spec.split(":")[1])
    with tempfile.TemporaryDirectory() as folder:
        os.environ[glyphs.CACHE_DIR_ENV] = folder
        _timed(f"choose {classes} classes", lambda: glyph_render.glyph_classes(classes))
        dataset = _timed("draw and cache the train split", lambda: build_dataset(args.spec))
        print(f"{len(dataset):,} samples of {dataset[0][0].shape}")
        glyphs.glyph_samples.cache_clear()
        _timed("build again from the cache", lambda: build_dataset(args.spec))


if __name__ == "__main__":
    main()
