"""Bytes per view against KL for every encoding, on a real teacher's logits at C = 1,000, V = 16.

    PYTHONPATH=. python pipelines/glyph_view_bytes.py --weights RUN/best.pt --out /tmp/glyph-bytes

1. Dumps the teacher (``--teacher``, trained by pipelines/glyph_results.py or ``kdcache train``)
   over the training samples of ``--dataset`` as a float32 store of V views of ``--recipe``
   (``dump_teacher``): the true logits of every view.
2. Writes them again into one store per encoding with ``create_store(..., views=V)``, in blocks
   of whole samples as a dump does, with view parameters drawn by the same recipe for 224 x 224
   inputs (FKD's and ImageNet's crops; a glyph's 16 x 16 crops would cost less), and measures
   the whole store on disk divided by its N * V views: logits arrays, ``view_params`` and the
   rest (labels, chunk flags and digests, metadata).
3. Reads every view back (``read_sparse`` / ``read_dense``) and measures KL(p_T || p_hat_T) in
   nats at T = 1, 2, 4, 8 against the true logits, next to FKD's top-5 soft labels
   (pipelines/fkd_soft_labels.py) on the same views.

Writes results.json and tables.md under --out and the figure docs/figures/glyphs-view-bytes.png
(``--figure``); prints the tables. Stores are deleted once measured unless --keep is given.
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
from fkd_soft_labels import fkd_kl
from view_bytes_bench import store_split

from kdcache import DumpConfig, create_store, dump_teacher, open_store, parse_recipe
from kdcache.logits.fidelity import kl_divergence, sparse_kl_divergence

TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
ENCODINGS = (
    "float16",
    "int8",
    "topk:1",
    "topk:5",
    "topk:10",
    "topk:20",
    "viewset:8",
    "viewset:12",
    "viewset:16",
    "viewset:20",
    "viewset:24",
    "viewset:32",
    "viewset:20:3",
    "viewset:24:3",
    "viewset:32:2",
)
RECIPE = "rrc:scale=0.5-1,ratio=0.8-1.25+flip"
#: FKD's bytes per crop (issue 21's anchors): top-5 ids and fp16 probabilities plus the box and
#: flip, and the float32 files its generator writes (pipelines/fkd_soft_labels.py).
FKD_FP16_BYTES, FKD_FP32_BYTES = 36, 57
#: Samples written per write() call: whole samples, as dump-teacher writes them.
BLOCK = 256


def teacher_logits(args: argparse.Namespace, out: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """The float32 logits (N * V, C) of every view, the labels, and the dump's record."""
    path = args.logits or out / "teacher-float32.zarr"
    started = time.perf_counter()
    if args.logits is None:
        dump_teacher(
            DumpConfig(
                teacher=args.teacher,
                weights=str(args.weights),
                dataset=args.dataset,
                out=str(path),
                encoding="float32",
                views=args.views,
                augment=args.recipe,
                batch_size=1024,
                overwrite=True,
            )
        )
    store = open_store(path)
    if store.metadata.encoding != "float32" or store.metadata.augment is None:
        raise SystemExit(f"{path}: --logits needs a float32 store with views (dump-teacher)")
    args.views, args.recipe = store.views, store.metadata.augment["recipe"]
    args.teacher = (store.metadata.teacher or {}).get("spec", args.teacher)
    args.dataset = (store.metadata.dataset or {}).get("spec", args.dataset)
    num_samples = min(args.samples or store.num_samples, store.num_samples)
    rows = np.arange(num_samples * store.views)
    logits = store.read_dense(rows).numpy()
    split = store_split(path, {"logits"})
    record = {
        "dump_s": time.perf_counter() - started,
        "num_samples": num_samples,
        "view_params_per_view_at_glyph_size": split["view_params"] / len(rows),
    }
    labels = None if store.labels is None else store.labels[:num_samples]
    assert labels is not None  # dump-teacher always stores them
    if args.logits is None:
        shutil.rmtree(path)
    return logits, labels, record


def write_store(
    path: Path, encoding: str, logits: np.ndarray, labels: np.ndarray, views: int, recipe: str
) -> dict[str, Any]:
    """A store of ``logits`` in ``encoding`` with 224 x 224 view parameters; its bytes by part."""
    num_samples = len(labels)
    spec = parse_recipe(recipe)
    table = spec.sample_table(seed=0, num_samples=num_samples, views=views, size=(224, 224))
    augment = {
        "recipe": spec.spec,
        "seed": 0,
        "fields": list(spec.fields),
        "input_size": [224, 224],
    }
    writer = create_store(
        path,
        num_samples=num_samples,
        num_classes=logits.shape[1],
        encoding=encoding,
        labels=labels,
        views=views,
        augment=augment,
        view_params=table,
        overwrite=True,
        fsync=False,  # durability does not change the bytes
    )
    started = time.perf_counter()
    for start in range(0, num_samples, BLOCK):
        rows = np.arange(start * views, min(start + BLOCK, num_samples) * views)
        writer.write(rows, logits[rows])
    writer.finalize()
    seconds = time.perf_counter() - started
    reader = open_store(path)
    split = store_split(path, set(reader.encoding.layout(logits.shape[1])))
    rows_total = num_samples * views
    return {
        "encoding": encoding,
        "bytes_per_view": sum(split.values()) / rows_total,
        "split_per_view": {part: n / rows_total for part, n in split.items()},
        "payload_per_view": reader.encoding.row_nbytes(logits.shape[1]),
        "write_rows_per_s": rows_total / seconds,
    }


def fidelity(path: Path, logits: np.ndarray) -> dict[str, Any]:
    """Mean KL(p_T || p_hat_T) at each T and top-1 agreement of the store's rows."""
    reader = open_store(path)
    sums, agreeing = np.zeros(len(TEMPERATURES)), 0
    for start in range(0, len(logits), 4096):
        rows = np.arange(start, min(start + 4096, len(logits)))
        true = torch.from_numpy(logits[rows])
        if reader.encoding.is_sparse:
            sparse = reader.read_sparse(rows)
            agreeing += int((sparse.indices[:, 0] == true.argmax(1)).sum())
            kls = [sparse_kl_divergence(true, sparse, t) for t in TEMPERATURES]
        else:
            dense = reader.read_dense(rows)
            agreeing += int((dense.argmax(1) == true.argmax(1)).sum())
            kls = [kl_divergence(true, dense, t) for t in TEMPERATURES]
        sums += [float(kl.sum()) for kl in kls]
    return {
        "kl": dict(zip(map(str, TEMPERATURES), (sums / len(logits)).tolist(), strict=True)),
        "top1_agreement": agreeing / len(logits),
    }


def fkd(logits: np.ndarray) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {"as_trained": {}, "tempered": {}, "best": {}}
    for t in TEMPERATURES:
        sums = dict.fromkeys(out, 0.0)
        for start in range(0, len(logits), 4096):
            block = torch.from_numpy(logits[start : start + 4096])
            for name, value in fkd_kl(block, t).items():
                sums[name] += value * len(block)
        for name in out:
            out[name][str(t)] = sums[name] / len(logits)
    return out


def tables(results: dict[str, Any]) -> str:
    fkd_rows = results["fkd_top5"]
    lines = [
        f"{results['num_samples']:,} samples x V = {results['views']} views of "
        f"`{results['recipe']}` "
        f"({results['num_samples'] * results['views']:,} rows, C = 1,000); teacher "
        f"`{results['teacher']}` on `{results['dataset']}`; view parameters drawn for 224 x 224 "
        f"(at the glyphs' 16 x 16 they cost {results['view_params_per_view_at_glyph_size']:.2f} B "
        "a view)",
        "",
        "| encoding | **B/view all in** | logits | view_params | rest | raw payload | KL T=1 | "
        "KL T=2 | KL T=4 | KL T=8 | top-1 agreement |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["stores"]:
        s, f = r["split_per_view"], r["fidelity"]
        kl = " | ".join(f"{f['kl'][str(t)]:.4g}" for t in TEMPERATURES)
        lines.append(
            f"| {r['encoding']} | **{r['bytes_per_view']:.1f}** | {s['logits']:.1f} | "
            f"{s['view_params']:.1f} | {s['rest']:.2f} | {r['payload_per_view']} | {kl} | "
            f"{100 * f['top1_agreement']:.2f}% |"
        )
    labels = {
        "as_trained": "FKD top-5 as it trains (the T = 1 target at every T)",
        "tempered": "FKD top-5, its target tempered (q^(1/T))",
        "best": "FKD top-5 best case (top-5 of p_T, rest uniform)",
    }
    for name, label in labels.items():
        kl = " | ".join(f"{fkd_rows[name][str(t)]:.4g}" for t in TEMPERATURES)
        lines.append(
            f"| {label} | {FKD_FP16_BYTES} (fp16), {FKD_FP32_BYTES} (fp32) | | | | | {kl} | 100% |"
        )
    return "\n".join(lines) + "\n"


def figure(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    families = {"topk": "o-", "viewset": "s-", "float16": "^", "int8": "v"}
    for ax, t in zip(axes, ("1.0", "4.0"), strict=True):
        for family, style in families.items():
            mine = [
                r
                for r in results["stores"]
                if r["encoding"].split(":")[0] == family
                and not (family == "viewset" and r["encoding"].count(":") == 2)
            ]
            xs = [r["bytes_per_view"] for r in mine]
            ys = [r["fidelity"]["kl"][t] for r in mine]
            ax.plot(
                xs,
                ys,
                style,
                label=family + (":K" if family == "topk" else ":M" if family == "viewset" else ""),
            )
            for r, x, y in zip(mine, xs, ys, strict=True):
                if ":" in r["encoding"]:
                    ax.annotate(
                        r["encoding"].split(":", 1)[1],
                        (x, y),
                        fontsize=7,
                        xytext=(3, 3),
                        textcoords="offset points",
                    )
        bits = [r for r in results["stores"] if r["encoding"].count(":") == 2]
        ax.plot(
            [r["bytes_per_view"] for r in bits],
            [r["fidelity"]["kl"][t] for r in bits],
            "D",
            label="viewset:M:BITS",
        )
        for name, style in (("as_trained", "x"), ("best", "+")):
            value = results["fkd_top5"][name][t]
            ax.plot(
                [FKD_FP16_BYTES, FKD_FP32_BYTES],
                [value, value],
                style,
                markersize=10,
                label=f"FKD top-5 ({name.replace('_', ' ')})",
            )
        ax.axvline(20, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("bytes per view, all in (224 x 224 rrc+flip parameters)")
        ax.set_ylabel(f"KL(teacher || decoded), T = {float(t):g} (nats)")
        ax.set_title(f"T = {float(t):g}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(
        f"C = 1,000 glyphs, V = {results['views']}: real {results['teacher']} logits, "
        "every encoding"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, help="the teacher's best.pt")
    parser.add_argument(
        "--logits",
        type=Path,
        help="a float32 store with views dump-teacher wrote: its logits, instead of a new dump",
    )
    parser.add_argument("--teacher", default="resnet:32")
    parser.add_argument(
        "--dataset", default="glyphs:1000:16:4", help="the first PER_CLASS training samples"
    )
    parser.add_argument("--views", type=int, default=16)
    parser.add_argument(
        "--samples", type=int, help="measure the first N samples only [default: all]"
    )
    parser.add_argument("--recipe", default=RECIPE)
    parser.add_argument("--encodings", default=",".join(ENCODINGS))
    parser.add_argument("--out", type=Path, default=Path("/tmp/kdcache-glyph-bytes"))
    parser.add_argument("--figure", type=Path, default=Path("docs/figures/glyphs-view-bytes.png"))
    parser.add_argument("--keep", action="store_true", help="keep the stores")
    args = parser.parse_args()
    if (args.weights is None) == (args.logits is None):
        parser.error("give --weights (a new dump) or --logits (an existing float32 store)")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    logits, labels, record = teacher_logits(args, args.out)
    results: dict[str, Any] = {
        "teacher": args.teacher,
        "dataset": args.dataset,
        "views": args.views,
        "recipe": args.recipe,
        **record,
        "stores": [],
    }
    for encoding in args.encodings.split(","):
        path = args.out / f"{encoding.replace(':', '-')}.zarr"
        row = write_store(path, encoding, logits, labels, args.views, args.recipe)
        row["fidelity"] = fidelity(path, logits)
        results["stores"].append(row)
        print(json.dumps(row), flush=True)
        if not args.keep:
            shutil.rmtree(path)
    results["fkd_top5"] = fkd(logits)
    results["wall_s"] = time.perf_counter() - started
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = tables(results)
    (args.out / "tables.md").write_text(text)
    figure(results, args.figure)
    print(text)


if __name__ == "__main__":
    main()
