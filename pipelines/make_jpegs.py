"""Write an image folder of photo-like JPEGs (smooth colour fields plus grain) for benchmarks.

    python pipelines/make_jpegs.py OUT --train 4096 --val 512 --classes 100 --size 400x300

OUT/train/cNNN/*.jpg and OUT/val/cNNN/*.jpg, deterministic for a given --seed, written by all
cores in parallel. ``kdcache ... --dataset imagefolder:OUT`` then resizes to 256 and crops 224.
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


def _write(job: tuple[str, int, int, int, int]) -> None:
    path, seed, width, height, quality = job
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 25 + 1, width // 25 + 1, 3), dtype=np.uint8)
    image = np.asarray(
        Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.int16
    )
    image = image + rng.integers(-12, 13, image.shape, dtype=np.int16)
    Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(path, quality=quality)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=4096, help="training images")
    parser.add_argument("--val", type=int, default=512, help="validation images")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--size", default="400x300", help="WIDTHxHEIGHT of every image")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    jobs = []
    for split, count, offset in (("train", args.train, 0), ("val", args.val, args.train)):
        for c in range(args.classes):
            (args.out / split / f"c{c:03d}").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            folder = args.out / split / f"c{i % args.classes:03d}"
            seed = args.seed * 10_000_019 + offset + i
            jobs.append((str(folder / f"{i:06d}.jpg"), seed, width, height, args.quality))
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_write, jobs, chunksize=64))
    total = sum(Path(job[0]).stat().st_size for job in jobs)
    print(f"wrote {len(jobs)} JPEGs ({total / len(jobs) / 1024:.1f} KiB each) under {args.out}")


if __name__ == "__main__":
    main()
