"""``kdcache bench lm``: a language model's dump, token feed and distillation, side by side.

One run measures, interleaved over ``repeats`` rounds (medians of per-round ratios, as the image
benchmarks do):

- the dump's loop against the bare teacher forward over the same sequences and batch size (the
  bare loop also copies each batch's token rows to the host, as any consumer must), in wall and
  in CPU seconds (every thread of the process), after one untimed round of each;
- the token feed: random batches of sequences read from the dumped store, loaded in memory;
- one epoch of CE-only training, of distillation from that store and of online distillation
  (the teacher in the loop), the same student, text, batch size and seed; the time compared is
  the last epoch's ``train_time_s``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcache.bench.distill import epoch_time
from kdcache.bench.feed import paired_ratio, round_floats, set_threads
from kdcache.bench.inputs import timed
from kdcache.config import DistillConfig, DumpConfig, TrainConfig
from kdcache.lm.dump import dump_lm
from kdcache.lm.models import CausalLM, load_causal_lm, pad_id
from kdcache.lm.text import TokenDataset, build_text_dataset, collate
from kdcache.runtime import autocast, resolve_device
from kdcache.store.sequence import open_sequence_store
from kdcache.train.loop import distill, train

__all__ = ["bench_lm"]

#: Temperature and weight of the distillation runs: what LM distillation commonly uses, and the
#: only temperature a ``sampled:S`` store serves.
TEMPERATURE = 1.0
ALPHA = 0.5


def _bare_forward(
    teacher: CausalLM,
    dataset: TokenDataset,
    *,
    batch_size: int,
    device: torch.device,
    amp: str | None,
) -> None:
    """The teacher over every sequence, each batch's token rows copied to the host."""
    pad = pad_id(teacher)
    with torch.inference_mode():
        for start in range(0, len(dataset), batch_size):
            samples = list(range(start, min(start + batch_size, len(dataset))))
            batch = collate(dataset, samples, pad_id=pad).to(device)
            with autocast(device, amp):
                rows = teacher.rows(batch.input_ids, batch.attention_mask, batch.mask)
            rows.to("cpu")


def _feed_tokens_per_s(path: Path, *, batch_size: int, batches: int, seed: int = 0) -> float:
    """Token rows per second that random batches of ``batch_size`` sequences are read at."""
    store = open_sequence_store(path)
    store.store.load()
    rng = np.random.default_rng(seed)
    store.read(rng.integers(0, store.num_sequences, size=batch_size))  # warm
    started, tokens = time.perf_counter(), 0
    for _ in range(batches):
        rows = store.read(rng.integers(0, store.num_sequences, size=batch_size))
        tokens += rows.shape[0]
    return tokens / (time.perf_counter() - started)


def bench_lm(
    *,
    teacher: str,
    student: str,
    dataset: str,
    batch_size: int = 16,
    encoding: str = "topk:32",
    epochs: int = 2,
    repeats: int = 3,
    device: str | None = None,
    threads: int | None = None,
    amp: str | None = None,
    feed_batches: int = 50,
) -> dict[str, Any]:
    """Dump vs bare teacher forward, the token feed, and cache vs CE-only vs online distillation.

    ``teacher`` and ``student`` are language-model specs (``hf:PATH``), ``dataset`` a
    ``text:FILE[:MAX_LENGTH]`` spec whose train split everything runs over. The store is dumped
    in ``encoding`` with ``batch_size`` sequences per forward; the distillation runs use
    T = 1 and alpha = 0.5 for ``epochs`` epochs each (the last one timed). ``amp`` applies to
    the bare forward, the dump and every run alike.
    """
    threads = set_threads(threads)
    torch_device = resolve_device(device)
    lm = load_causal_lm(teacher, device=torch_device)
    lm.model.eval().requires_grad_(False)
    data = build_text_dataset(dataset, split="train", tokenizer=lm.tokenizer)
    vocab_size = lm.vocab_size
    bare: list[float] = []
    loop: list[float] = []
    # CPU seconds of the whole process (every thread): steadier than wall time on a shared
    # machine, and what the encoding adds to the forward's work.
    bare_cpu: list[float] = []
    loop_cpu: list[float] = []
    times: dict[str, list[float]] = {"ce": [], "cache": [], "online": []}
    # resumable=False: a throwaway run need not write its state (three students) every epoch.
    common: dict[str, Any] = dict(
        epochs=epochs,
        batch_size=batch_size,
        device=str(torch_device),
        amp=amp,
        overwrite=True,
        resumable=False,
    )
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as scratch:
        root = Path(scratch)
        store = root / "teacher.zarr"
        config = DumpConfig(
            teacher=teacher,
            dataset=dataset,
            out=str(store),
            encoding=encoding,
            batch_size=batch_size,
            device=str(torch_device),
            amp=amp,
            overwrite=True,
        )

        def run_bare() -> tuple[float, float]:
            cpu = time.process_time()
            wall = timed(
                lambda: _bare_forward(
                    lm, data, batch_size=batch_size, device=torch_device, amp=amp
                ),
                torch_device,
            )
            return wall, time.process_time() - cpu

        def run_dump() -> tuple[float, float]:
            result = dump_lm(config)
            return result.loop_time_s, result.loop_cpu_s

        # A round untimed first: kernels, allocator and page cache warm for both alike.
        run_bare()
        run_dump()
        for round_index in range(max(1, repeats)):
            # Alternate which runs first, so neither always meets the machine warmer or busier.
            kinds = ("bare", "dump") if round_index % 2 == 0 else ("dump", "bare")
            for kind in kinds:
                wall, cpu = run_bare() if kind == "bare" else run_dump()
                (bare if kind == "bare" else loop).append(wall)
                (bare_cpu if kind == "bare" else loop_cpu).append(cpu)
        feed = _feed_tokens_per_s(store, batch_size=batch_size, batches=feed_batches)
        runs = {
            "ce": lambda out: train(TrainConfig(model=student, dataset=dataset, out=out, **common)),
            "cache": lambda out: distill(
                DistillConfig(
                    student=student,
                    cache=str(store),
                    out=out,
                    temperature=TEMPERATURE,
                    alpha=ALPHA,
                    **common,
                )
            ),
            "online": lambda out: distill(
                DistillConfig(
                    student=student,
                    teacher=teacher,
                    dataset=dataset,
                    out=out,
                    temperature=TEMPERATURE,
                    alpha=ALPHA,
                    **common,
                )
            ),
        }
        names = list(runs)
        for round_index in range(max(1, repeats)):
            # Rotate the order so no kind always runs first (warm caches) or last.
            for name in names[round_index % 3 :] + names[: round_index % 3]:
                out = root / f"{name}{round_index}"
                runs[name](str(out))
                times[name].append(epoch_time(out))
    tokens = data.num_tokens
    bare_s, loop_s = statistics.median(bare), statistics.median(loop)
    ce, cache, online = (statistics.median(times[name]) for name in ("ce", "cache", "online"))
    return round_floats(
        {
            "benchmark": "lm",
            "teacher": teacher,
            "student": student,
            "dataset": dataset,
            "num_sequences": len(data),
            "num_tokens": tokens,
            "vocab_size": vocab_size,
            "batch_size": batch_size,
            "encoding": encoding,
            "device": str(torch_device),
            "threads": threads,
            "amp": amp,
            "repeats": len(bare),
            "bare_forward_s": bare_s,
            "dump_loop_s": loop_s,
            "bare_forward_tokens_per_s": tokens / bare_s,
            "dump_loop_tokens_per_s": tokens / loop_s,
            "dump_over_bare_throughput": paired_ratio(bare, loop),
            "bare_forward_cpu_s": statistics.median(bare_cpu),
            "dump_loop_cpu_s": statistics.median(loop_cpu),
            "dump_over_bare_cpu_throughput": paired_ratio(bare_cpu, loop_cpu),
            "feed_tokens_per_s": feed,
            "ce_epoch_s": ce,
            "cache_epoch_s": cache,
            "online_epoch_s": online,
            "cache_over_ce": paired_ratio(times["cache"], times["ce"]),
            "online_over_cache": paired_ratio(times["online"], times["cache"]),
            "ce_tokens_per_s": tokens / ce,
            "cache_tokens_per_s": tokens / cache,
            "online_tokens_per_s": tokens / online,
            "epochs_per_run": epochs,
            "all_bare_forward_s": bare,
            "all_dump_loop_s": loop,
            "all_bare_forward_cpu_s": bare_cpu,
            "all_dump_loop_cpu_s": loop_cpu,
            "all_epoch_s": times,
        }
    )
