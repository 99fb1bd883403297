"""What encoding a language model's rows costs the writer per row, before and after a change.

For each encoding, the CPU microseconds per row of ``Encoding.encode`` and of the fidelity the
writer measures (every 8th row, as ``kdcache.logits.fidelity.sample_stride`` picks), on Zipf-like
synthetic rows (``-log(1 + id) + 3 N(0, 1)``) of V classes, one torch thread. For an encoding a GPU
dump reduces on the device (``kdcache.logits.reduced``), also the two shares of that path: the
reduction (timed here on the CPU; on a GPU it runs on the device) and what is left to the
writer's host thread (converting the reduced rows to the store's arrays). With ``--before
DIR`` (a checkout of the older code) each round times that code in a subprocess, then this one,
so both meet the same load; medians over the rounds are printed side by side:

    git archive e4d4fa7 | tar -x -C /tmp/lmspeed-before
    OMP_NUM_THREADS=1 PYTHONPATH=. python pipelines/lm_encode_bench.py --before /tmp/lmspeed-before
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ENCODINGS = ("topk:32", "sampled:16")


def measure(encodings: list[str], num_classes: int, rows: int) -> dict[str, dict[str, float]]:
    """CPU us per row of the encode and of the fidelity (amortised over 8 rows) per encoding."""
    import numpy as np
    import torch

    from kdcache.logits.encodings import SampledEncoding, TopKEncoding, parse_encoding
    from kdcache.logits.fidelity import FidelityAccumulator
    from kdcache.logits.reduced import ReducedRows, reduce_rows, reduces
    from kdcache.logits.sparse import as_numpy

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    logits = -np.log1p(np.arange(num_classes)) + 3 * rng.standard_normal((rows, num_classes))
    logits = logits.astype(np.float32)
    out = {}
    for spec in encodings:
        encoding = parse_encoding(spec, num_classes=num_classes)
        started = time.process_time()
        encoded = encoding.encode(logits)
        encode_s = time.process_time() - started
        fidelity = FidelityAccumulator(encoding, sample_every=8)
        started = time.process_time()
        fidelity.update(logits, encoded, indices=np.arange(rows))
        fidelity.result()
        fidelity_s = time.process_time() - started
        out[spec] = {"encode_us": encode_s / rows * 1e6, "fidelity_us": fidelity_s / rows * 1e6}
        if reduces(encoding):
            # Only sampled:S takes the rows' indices (and only code that reduces it knows them).
            where = {} if spec.startswith("topk") else {"rows": np.arange(rows)}
            started = time.process_time()
            reduced = reduce_rows(
                torch.from_numpy(logits), encoding, measured=np.zeros(rows, bool), **where
            )
            reduce_s = time.process_time() - started
            started = time.process_time()
            if isinstance(reduced, ReducedRows):
                assert isinstance(encoding, TopKEncoding)
                encoding.encode_selected(
                    as_numpy(reduced.values), as_numpy(reduced.indices), as_numpy(reduced.tail)
                )
            else:
                assert isinstance(encoding, SampledEncoding)
                encoding.encode_drawn(as_numpy(reduced.classes), as_numpy(reduced.counts))
            host_s = time.process_time() - started
            out[spec] |= {
                "device_part_us": reduce_s / rows * 1e6,
                "host_part_us": host_s / rows * 1e6,
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="a checkout of the code to compare with")
    parser.add_argument("--classes", type=int, default=32000, help="vocabulary size V")
    parser.add_argument("--rows", type=int, default=512, help="rows per timing")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--encodings", nargs="+", default=list(ENCODINGS))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.encodings, args.classes, args.rows)))
        return
    codes = {"after": os.getcwd()} if args.before is None else {"before": args.before}
    codes.setdefault("after", os.getcwd())
    runs: dict[str, list[dict]] = {code: [] for code in codes}
    for _ in range(args.rounds):
        for code, tree in codes.items():
            command = [sys.executable, os.path.abspath(__file__), "--child"]
            command += ["--classes", str(args.classes), "--rows", str(args.rows)]
            command += ["--encodings", *args.encodings]
            env = {**os.environ, "PYTHONPATH": tree}
            result = subprocess.run(command, cwd=tree, env=env, capture_output=True, check=True)
            runs[code].append(json.loads(result.stdout))
    print(f"V = {args.classes}, {args.rows} rows, medians of {args.rounds} rounds, CPU us/row")
    print("| encoding | part | " + " | ".join(codes) + " |")
    print("|---|---|" + "---|" * len(codes))
    for spec in args.encodings:
        for part in ("encode_us", "fidelity_us", "device_part_us", "host_part_us"):
            cells = [
                f"{statistics.median(run[spec][part] for run in runs[code]):,.1f}"
                if all(part in run[spec] for run in runs[code])
                else "-"
                for code in codes
            ]
            print(f"| {spec} | {part.removesuffix('_us')} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
