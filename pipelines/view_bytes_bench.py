"""Bytes per view of multi-view stores at C = 1000, and their fidelity against FKD's top-5.

    PYTHONPATH=. python pipelines/view_bytes_bench.py --out /tmp/kdcache-view-bytes

Builds real stores through kdcache's public API (``create_store(..., views=V, augment=...,
view_params=...)``, ``write``, ``finalize``) for every recipe, V and encoding, and reports the
whole store on disk divided by its N * V views, split into the logits arrays, ``view_params``
and the rest (labels, chunk flags and digests, metadata). Prints Markdown tables
(docs/results.md holds a run's output) and writes them, with the raw numbers as JSON, under
--out. Stores are deleted once measured unless --keep is given.

* **Logits.** :func:`encodings_bench.imagenet_like_features` gives each sample a feature; view
  v of sample i moves it by ``spread * N(0, I) / 8`` in its 64 dimensions (a crop shows a
  different part of the picture), renormalises, and adds fresh N(0, 0.5^2) logit noise. With
  the default spread 0.5 a view's top-1 is the true class for 67% of views (81% for the
  un-augmented sample) and two views of a sample share their top-1 61% of the time.
* **View parameters** are drawn by the real recipes with ``parse_recipe(spec).sample_table`` for
  224 x 224 inputs.
* **Fidelity** is measured on the largest V's ``rrc+flip`` stores (the logits do not depend on
  the recipe), over every view of every ``--fidelity-every``-th sample, read back through
  ``read_dense`` / ``read_sparse``, as KL(p_T || p_hat_T) in nats at T = 1, 2, 4, 8 and top-1
  agreement. The same rows are compared with three readings of FKD's top-5 soft labels
  (:func:`fkd_kl`).

The same split for real digits dumps (C = 10) is pipelines/view_bytes_digits.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from encodings_bench import imagenet_like_features
from fkd_soft_labels import FKD_BYTES_PER_CROP, fkd_kl

from kdcache import create_store, open_store, parse_recipe
from kdcache.logits.fidelity import kl_divergence, sparse_kl_divergence

TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
RECIPES = ("rrc+flip", "rrc+flip+mixup:0.2")
ENCODINGS = ("float16", "int8", "topk:3", "topk:5", "topk:10")
INPUT_SIZE = (224, 224)
#: Samples generated and written per step: bounds memory at V = 16 (512 * 16 rows of 4 KB).
BLOCK = 512


class ViewTeacher:
    """Correlated logits of V views per sample from the imagenet-like teacher."""

    def __init__(self, num_samples: int, *, spread: float, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.prototypes, self.features, self.labels = imagenet_like_features(rng, num_samples)
        self.spread = spread
        self.seed = seed

    def block(self, start: int, stop: int, views: int) -> np.ndarray:
        """Float32 logits ``(stop - start, views, C)``, the same for the same arguments."""
        rng = np.random.default_rng([self.seed, start, views])
        dim = self.features.shape[1]
        moved = self.features[start:stop, None, :] + self.spread * rng.normal(
            size=(stop - start, views, dim)
        ) / np.sqrt(dim)
        moved /= np.linalg.norm(moved, axis=2, keepdims=True)
        logits = 32.0 * moved @ self.prototypes.T
        logits += 0.5 * rng.normal(size=logits.shape)
        return logits.astype(np.float32)


def store_split(path: Path, logit_arrays: set[str]) -> dict[str, int]:
    """Bytes of ``path`` by part: the logits arrays, ``view_params`` and everything else."""
    split = {"logits": 0, "view_params": 0, "rest": 0}
    for item in path.rglob("*"):
        if item.is_file():
            top = item.relative_to(path).parts[0]
            part = "logits" if top in logit_arrays else top if top in split else "rest"
            split[part] += item.stat().st_size
    return split


def _name(spec: str, views: int, encoding: str) -> str:
    return f"{spec.replace('+', '_').replace(':', '')}-v{views}-{encoding.replace(':', '')}"


def build_stores(
    out: Path,
    teacher: ViewTeacher,
    views: int,
    *,
    encodings: tuple[str, ...],
    num_samples: int,
    fidelity_every: int,
) -> tuple[list[dict[str, Any]], dict[str, Path], np.ndarray, np.ndarray]:
    """Write every recipe x encoding store with ``views`` views; return their byte rows, the
    paths of the ``rrc+flip`` stores, and the rows and true logits kept for fidelity."""
    writers, paths, params_seconds, tables = {}, {}, {}, {}
    for spec in RECIPES:
        recipe = parse_recipe(spec)
        started = time.perf_counter()
        table = recipe.sample_table(seed=0, num_samples=num_samples, views=views, size=INPUT_SIZE)
        params_seconds[spec] = time.perf_counter() - started
        tables[spec] = table
        augment = {
            "recipe": recipe.spec,
            "seed": 0,
            "fields": list(recipe.fields),
            "input_size": list(INPUT_SIZE),
        }
        for encoding in encodings:
            path = out / f"{_name(spec, views, encoding)}.zarr"
            shutil.rmtree(path, ignore_errors=True)
            paths[spec, encoding] = path
            writers[spec, encoding] = create_store(
                path,
                num_samples=num_samples,
                num_classes=1000,
                encoding=encoding,
                labels=teacher.labels,
                views=views,
                augment=augment,
                view_params=table,
                fsync=False,  # durability does not change the bytes; skip its cost
            )
    kept_rows, kept_logits = [], []
    for start in range(0, num_samples, BLOCK):
        stop = min(start + BLOCK, num_samples)
        logits = teacher.block(start, stop, views).reshape(-1, 1000)
        rows = np.arange(start * views, stop * views)
        for writer in writers.values():
            writer.write(rows, logits)
        keep = (rows // views) % fidelity_every == 0
        kept_rows.append(rows[keep])
        kept_logits.append(logits[keep])
    results = []
    for (spec, encoding), writer in writers.items():
        writer.finalize()
        path = paths[spec, encoding]
        reader = open_store(path)
        # The store gives back exactly the parameters it was given.
        np.testing.assert_array_equal(reader.view_params, tables[spec])
        split = store_split(path, set(reader.encoding.layout(1000)))
        total = sum(split.values())
        rows_total = num_samples * views
        results.append(
            {
                "recipe": spec,
                "views": views,
                "encoding": encoding,
                "params_per_view": len(parse_recipe(spec).fields),
                "bytes": total,
                "bytes_per_view": total / rows_total,
                "bytes_per_image": total / num_samples,
                "split_per_view": {part: n / rows_total for part, n in split.items()},
                "logits_payload_per_view": reader.encoding.row_nbytes(1000),
                "sample_table_s": params_seconds[spec],
            }
        )
        print(json.dumps(results[-1]), flush=True)
    rrc = {encoding: paths["rrc+flip", encoding] for encoding in encodings}
    return results, rrc, np.concatenate(kept_rows), np.concatenate(kept_logits)


def fidelity(paths: dict[str, Path], rows: np.ndarray, logits_np: np.ndarray) -> dict[str, Any]:
    """KL and top-1 agreement of every encoding and of FKD's top-5 on the same ``rows``."""
    logits = torch.from_numpy(logits_np)
    rows_out: dict[str, Any] = {}
    for encoding, path in paths.items():
        reader = open_store(path)
        sums, agreeing = np.zeros(len(TEMPERATURES)), 0
        for start in range(0, len(rows), 4096):
            part, true = rows[start : start + 4096], logits[start : start + 4096]
            if reader.encoding.is_sparse:
                sparse = reader.read_sparse(part)
                agreeing += int((sparse.indices[:, 0] == true.argmax(1)).sum())
                kls = [sparse_kl_divergence(true, sparse, t) for t in TEMPERATURES]
            else:
                dense = reader.read_dense(part)
                agreeing += int((dense.argmax(1) == true.argmax(1)).sum())
                kls = [kl_divergence(true, dense, t) for t in TEMPERATURES]
            sums += [kl.sum().item() for kl in kls]
        rows_out[encoding] = {
            "kl": dict(zip(map(str, TEMPERATURES), (sums / len(rows)).tolist(), strict=True)),
            "top1_agreement": agreeing / len(rows),
        }
        print(encoding, json.dumps(rows_out[encoding]), flush=True)
    fkd: dict[str, dict[str, float]] = {"as_trained": {}, "tempered": {}, "best": {}}
    for t in TEMPERATURES:
        weighted = dict.fromkeys(fkd, 0.0)
        for start in range(0, len(rows), 4096):
            block = logits[start : start + 4096]
            for name, value in fkd_kl(block, t).items():
                weighted[name] += value * len(block)
        for name in fkd:
            fkd[name][str(t)] = weighted[name] / len(rows)
    # FKD keeps the exact top-5 classes: its top-1 agrees unless the top two logits tie.
    return {"num_rows": len(rows), "encodings": rows_out, "fkd_top5": fkd}


def tables(results: dict[str, Any]) -> str:
    n = results["num_samples"]
    parts = [
        f"### Bytes per view at C = 1000 (N = {n:,} samples, 224 x 224 recipes)",
        "",
        "Whole store on disk / (N * V); the split is logits arrays / `view_params` / the rest "
        "(labels, chunk flags and digests, zarr.json and the record).",
        "",
        "| recipe (P floats) | encoding | V | B/view | logits | view_params | rest | B/image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(
        results["stores"],
        key=lambda r: (
            RECIPES.index(r["recipe"]),
            results["encodings"].index(r["encoding"]),
            r["views"],
        ),
    ):
        s = r["split_per_view"]
        parts.append(
            f"| {r['recipe']} ({r['params_per_view']}) | {r['encoding']} | {r['views']} | "
            f"**{r['bytes_per_view']:.1f}** | {s['logits']:.1f} | {s['view_params']:.1f} | "
            f"{s['rest']:.2f} | {r['bytes_per_image']:,.0f} |"
        )
    parts += [
        "",
        f"FKD stores {results['fkd_bytes_per_crop']} B per crop (a (2, 5) float32 tensor of top-5 "
        "class indices and probabilities, 4 float32 box coordinates, a flip byte), before the "
        "overhead of its per-image files.",
    ]
    f = results["fidelity"]
    fkd = f["fkd_top5"]
    parts += [
        "",
        f"### Fidelity at C = 1000 ({f['num_rows']:,} views of V = {results['fidelity_views']}, "
        "KL(p_T || p_hat_T) in nats)",
        "",
        "| target | KL T=1 | KL T=2 | KL T=4 | KL T=8 | top-1 agreement |",
        "|---|---|---|---|---|---|",
    ]
    for encoding, r in f["encodings"].items():
        kl = " | ".join(f"{r['kl'][str(t)]:.4g}" for t in TEMPERATURES)
        parts.append(f"| kdcache {encoding} | {kl} | {100 * r['top1_agreement']:.2f}% |")
    labels = {
        "as_trained": "FKD top-5 as trained (T = 1 target at every T)",
        "tempered": "FKD top-5, target tempered (q^(1/T))",
        "best": "FKD top-5 best case (top-5 of p_T, rest uniform)",
    }
    for name, label in labels.items():
        kl = " | ".join(f"{fkd[name][str(t)]:.4g}" for t in TEMPERATURES)
        parts.append(f"| {label} | {kl} | 100% |")
    top5 = f["encodings"].get("topk:5")
    if top5 is not None:
        excess = ", ".join(
            f"{top5['kl'][str(t)] / fkd['best'][str(t)] - 1:+.1e}" for t in TEMPERATURES
        )
        parts += ["", f"topk:5 KL / FKD best case - 1 at T = 1, 2, 4, 8: {excess}"]
    return "\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", default="/tmp/kdcache-view-bytes", help="Folder for stores and results."
    )
    parser.add_argument("--samples", type=int, default=20_000, help="Samples (images) per store.")
    parser.add_argument(
        "--views", default="1,4,16", help="Comma-separated V values; fidelity uses the largest."
    )
    parser.add_argument(
        "--encodings", default=",".join(ENCODINGS), help="Comma-separated encodings to store."
    )
    parser.add_argument(
        "--spread", type=float, default=0.5, help="How far a view moves a sample's feature."
    )
    parser.add_argument(
        "--fidelity-every", type=int, default=8, help="Measure fidelity on every k-th sample."
    )
    parser.add_argument("--keep", action="store_true", help="Keep the stores after measuring.")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    views_list = sorted(int(v) for v in args.views.split(","))
    encodings = tuple(args.encodings.split(","))
    teacher = ViewTeacher(args.samples, spread=args.spread)
    results: dict[str, Any] = {
        "num_samples": args.samples,
        "spread": args.spread,
        "fidelity_views": views_list[-1],
        "encodings": list(encodings),
        "fkd_bytes_per_crop": FKD_BYTES_PER_CROP,
        "stores": [],
    }
    for views in views_list:
        stores, rrc, rows, logits = build_stores(
            out,
            teacher,
            views,
            encodings=encodings,
            num_samples=args.samples,
            fidelity_every=args.fidelity_every,
        )
        results["stores"] += stores
        if views == views_list[-1]:
            results["fidelity"] = fidelity(rrc, rows, logits)
        if not args.keep:
            for store in stores:
                shutil.rmtree(out / f"{_name(store['recipe'], views, store['encoding'])}.zarr")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = tables(results)
    (out / "tables.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
