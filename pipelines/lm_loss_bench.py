"""Forward + backward time of the token-level kd loss against CE alone, on CPU.

    PYTHONPATH=. python pipelines/lm_loss_bench.py [--vocab 32000] [--before OLD_sequence_losses.py]

Student logits (8 x 128 positions, ``--vocab`` classes) against ``topk:32`` teacher rows; each
round times CE alone (``F.cross_entropy``), then ``TokenDistillationLoss`` (kd, alpha = 0.5) at
T = 1 and T = 2, and, with ``--before``, the same loss from another copy of
``kdcache/logits/sequence_losses.py`` (e.g. ``git show REV:kdcache/logits/sequence_losses.py``)
loaded beside it, interleaved in one process. Prints the medians of ``--rounds`` and their
ratio to CE alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kdcache.logits.encodings import parse_encoding
from kdcache.logits.sequence_losses import TokenDistillationLoss


def _loaded(path: str) -> type:
    spec = importlib.util.spec_from_file_location("before_sequence_losses", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.TokenDistillationLoss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--before", help="another sequence_losses.py to time beside this one")
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(8, 128, args.vocab, generator=generator)
    mask = torch.ones(8, 128, dtype=torch.bool)
    mask[:, -1] = False
    targets = torch.randint(0, args.vocab, (8, 128), generator=generator)
    encoding = parse_encoding("topk:32", num_classes=args.vocab)
    logits = torch.randn(int(mask.sum()), args.vocab, generator=generator) * 3
    teacher = encoding.sparse(encoding.encode(logits.numpy()))

    def ce() -> None:
        leaf = student.clone().requires_grad_(True)
        F.cross_entropy(leaf[mask], targets[mask]).backward()

    def kd(loss_class: type, temperature: float) -> Callable[[], None]:
        loss = loss_class(temperature=temperature, alpha=0.5)

        def run() -> None:
            leaf = student.clone().requires_grad_(True)
            loss(leaf, teacher, targets, mask)["total"].backward()

        return run

    runs: dict[str, Callable[[], None]] = {"ce": ce}
    classes: dict[str, type] = {"now": TokenDistillationLoss}
    if args.before:
        classes["before"] = _loaded(args.before)
    for temperature in (1.0, 2.0):
        for name, loss_class in classes.items():
            runs[f"kd T={temperature:g} {name}"] = kd(loss_class, temperature)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    ce_s = statistics.median(times["ce"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:16s} {median * 1000:8.1f} ms  {median / ce_s:5.2f} x CE alone")


if __name__ == "__main__":
    main()
