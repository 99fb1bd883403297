"""One cache, many experiments: distill a student once per (loss, alpha, temperature, seed).

Every run reads the same store (or the same several stores of a multi-teacher sweep, combined
in each run's loss as ``distill --cache a --cache b`` combines them), opened and decoded once;
the teacher never runs. Each setting
gets its own folder under ``out``; a finished one (``last.pt``, a metrics file covering every
epoch and its ``result.json``) is skipped when the sweep is run again, a half-finished one
continues from its last evaluation (``--resume``), or starts over if it had none. The sweep ends
with ``results.csv`` (one row per run) and ``sweep.png``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcache.config import SHARED_FIELDS, DistillConfig, SweepConfig, setting_name
from kdcache.data.datasets import canonical_dataset_spec
from kdcache.distributed import rank_info
from kdcache.errors import ConfigError, KdcacheError, ResumeMismatchError
from kdcache.models import canonical_model_spec
from kdcache.options import IMAGE, LM, refuse_foreign_options
from kdcache.plots.figures import plot_sweep, read_metrics
from kdcache.store.format.location import refuse_inside_store
from kdcache.store.read.private_folder import private_folder
from kdcache.store.read.reader import StoreReader, open_store
from kdcache.store.sequence import is_sequence_store
from kdcache.store.tools.merge import check_same_rows
from kdcache.store.tools.report import teacher_statistics
from kdcache.temporaries import TemporaryFile
from kdcache.train.loop import RunResult, distill, modality
from kdcache.train.parallel import run_concurrently
from kdcache.train.preflight import check_model, check_store_run, store_dataset
from kdcache.train.resume import RESUME_FILE

log = logging.getLogger("kdcache")

RESULTS_CSV = "results.csv"
SWEEP_FIGURE = "sweep.png"
RUN_RESULT = "result.json"
CSV_COLUMNS = (
    "setting",
    "loss",
    "alpha",
    "temperature",
    "seed",
    "best_val_acc",
    "final_val_acc",
    "best_epoch",
    "best_step",
    "epochs",
    "wall_time_s",
    "run_dir",
)
#: Options that change how fast a run goes, not what it learns: a finished run is reused whatever
#: they were. Every other option shared with DistillConfig must match for a run to be reused.
_RUNTIME_ONLY_FIELDS = ("device", "num_workers", "cache_memory")


@dataclass(frozen=True)
class SweepResult:
    """Per-run rows (as in ``results.csv``), the files written and how many runs were reused."""

    rows: list[dict[str, Any]]
    results_csv: str
    figure: str
    runs_done: int
    runs_skipped: int


def _finished_result(config: DistillConfig) -> RunResult | None:
    """The saved result of a run that completed every epoch with these settings, else None.

    A run folder left by a sweep with other settings is refused rather than rerun, so that one
    sweep folder never mixes, or silently replaces, the runs of two different sweeps.
    """
    folder = Path(config.out)
    config_path, result_path, metrics_path = (
        folder / "config.json",
        folder / RUN_RESULT,
        folder / "metrics.jsonl",
    )
    if not config_path.is_file():
        return None
    saved = json.loads(config_path.read_text())
    for field in SHARED_FIELDS:
        if field.name in _RUNTIME_ONLY_FIELDS:
            continue
        # Through JSON, so that tuples compare with the lists they were saved as; an option
        # newer than the run folder compares as its default.
        default = None if field.default is dataclasses.MISSING else field.default
        was = saved.get(field.name, _as_json(default))
        wanted = _as_json(getattr(config, field.name))
        if _canonical(field.name, was) != _canonical(field.name, wanted):
            raise KdcacheError(
                f"{folder} was run with {field.name}={was!r} but this sweep asks for {wanted!r}; "
                f"use another --out for the new sweep, or delete {folder}"
            )
    if not all(path.is_file() for path in (folder / "last.pt", result_path, metrics_path)):
        return None
    epochs = [
        record.get("epoch")
        for record in read_metrics(metrics_path)
        if "epoch_progress" not in record  # an evaluation within an epoch
    ]
    if epochs != list(range(1, config.epochs + 1)):
        return None
    return _load_result(result_path)


def _load_result(path: Path) -> RunResult:
    saved = json.loads(path.read_text())
    if "metric" not in saved:  # a result.json written when only image runs reported accuracy
        saved = {
            "metric": "val_acc",
            "best": saved.pop("best_val_acc"),
            "final": saved.pop("final_val_acc"),
            **saved,
        }
    return RunResult(**saved)


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _canonical(name: str, value: Any) -> Any:
    """A spec with its defaults spelled out (``mlp`` is ``mlp:128``), other values as they are."""
    if isinstance(value, str) and name == "student":
        return canonical_model_spec(value)
    if isinstance(value, str) and name == "dataset":
        return canonical_dataset_spec(value)
    return value


def _store_identity(readers: Sequence[StoreReader], config: SweepConfig) -> dict[str, Any]:
    """What ties a sweep folder to its stores and one dataset: every run in it must share them
    (with several stores, each one's generation and teacher, in order)."""
    meta = readers[0].metadata
    recorded = meta.dataset or {}
    dataset = config.dataset or recorded.get("spec")
    generations = [r.metadata.generation or r.metadata.created_at for r in readers]
    teachers = [r.metadata.teacher for r in readers]
    return {
        "generation": generations[0] if len(readers) == 1 else generations,
        "teacher": teachers[0] if len(readers) == 1 else teachers,
        "dataset": None if dataset is None else canonical_dataset_spec(dataset),
        "split": config.split or recorded.get("split"),
        "labels_sha256": (recorded.get("fingerprint") or {}).get("labels_sha256"),
    }


def _claim_folder(out: Path, identity: dict[str, Any], cache: str) -> None:
    """Refuse a sweep folder that holds runs from another store or dataset."""
    saved_path = out / "sweep.json"
    if not saved_path.is_file():
        return
    try:
        saved = json.loads(saved_path.read_text())
    except ValueError:
        saved = {}
    if not isinstance(saved, dict):
        saved = {}
    before = saved.get("store_identity")
    if before is None:  # written before identities were recorded: the store path must match
        if saved.get("cache") not in (None, cache):
            before = {"cache": saved.get("cache")}
            identity = {"cache": cache}
        else:
            return
    changed = [key for key in identity if before.get(key) != identity[key]]
    if changed:
        difference = _difference(changed[0], before, identity, saved.get("cache"), cache)
        raise KdcacheError(
            f"{out} holds a sweep over another store or dataset: {difference}; one sweep folder "
            "never mixes two teachers or datasets: use another --out"
        )


def _difference(
    key: str, before: dict[str, Any], now: dict[str, Any], before_cache: str | None, cache: str
) -> str:
    """How a sweep folder's store identity differs from this sweep's, in a user's terms."""
    if key == "generation":
        if before_cache in (None, cache):
            return f"{cache} was dumped again since its runs were trained"
        return f"its runs were distilled from {before_cache}, not {cache}"
    if key == "teacher" and not isinstance(now[key], list) and not isinstance(before[key], list):
        return (
            f"its runs were distilled from teacher {(before['teacher'] or {}).get('spec')!r}, "
            f"{cache} holds teacher {(now['teacher'] or {}).get('spec')!r}"
        )
    if key == "labels_sha256":
        return f"its runs were trained on other labels than {cache} holds"
    if key == "cache":
        return f"its runs were distilled from {before_cache}, not {cache}"
    return f"its runs used {key} {before.get(key)!r}, this sweep {now[key]!r}"


def _save_result(result: RunResult, folder: Path) -> None:
    text = json.dumps(dataclasses.asdict(result), indent=2) + "\n"
    with TemporaryFile.create(
        folder / (RUN_RESULT + ".tmp"), purpose=f"{RUN_RESULT} being saved"
    ) as temporary:
        temporary.stream.write(text.encode())
        temporary.publish(folder / RUN_RESULT)  # written last: its presence marks the run finished


def _row(config: DistillConfig, result: RunResult) -> dict[str, Any]:
    return {
        "setting": setting_name(config.loss, config.alpha, config.temperature),
        "loss": config.loss,
        "alpha": config.alpha,
        "temperature": config.temperature,
        "seed": config.seed,
        "best_val_acc": round(result.best, 4),
        "final_val_acc": round(result.final, 4),
        "best_epoch": result.best_epoch,
        "best_step": result.best_step,
        "epochs": result.epochs,
        "wall_time_s": round(result.wall_time_s, 3),
        "run_dir": os.path.basename(config.out),
    }


def write_results_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Write the per-run rows atomically, in :data:`CSV_COLUMNS` order."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    with TemporaryFile.create(
        path.with_name(path.name + ".tmp"), purpose=f"{path.name} being saved"
    ) as temporary:
        temporary.stream.write(text.getvalue().encode())
        temporary.publish(path)


def _run_and_save(run: DistillConfig, readers: Sequence[StoreReader] = ()) -> RunResult:
    """Train one run and mark it finished; in a ``--jobs`` worker, on the node's shared tables."""
    log.info("%s: started", os.path.basename(run.out))
    if not readers:
        readers = [_worker_reader(store, run.cache_memory) for store in run.stores]
    # A folder here holds at most a half-finished run: it continues from its last evaluation if
    # it saved one and this sweep can (its --num-workers or the memory it reads the store in may
    # have changed since), else it starts over.
    result = None
    if (Path(run.out) / RESUME_FILE).is_file():
        try:
            result = distill(dataclasses.replace(run, resume=True), members=readers)
        except ResumeMismatchError as error:
            log.warning(
                "%s: starting over, it cannot continue: %s", os.path.basename(run.out), error
            )
    if result is None:
        result = distill(dataclasses.replace(run, overwrite=True), members=readers)
    _save_result(result, Path(run.out))
    return result


_WORKER_READERS: dict[tuple[Any, Any], StoreReader] = {}


def _worker_reader(cache: str, memory: int | str | None) -> StoreReader:
    """A store of a ``--jobs`` worker, opened once per process and kept for its next runs."""
    key = (cache, memory)
    if key not in _WORKER_READERS:
        reader = open_store(cache, memory_budget=memory)
        reader.feed.load(shared=True)  # one table for all the workers on this machine
        _WORKER_READERS[key] = reader
    return _WORKER_READERS[key]


def run_sweep(config: SweepConfig) -> SweepResult:
    """Run (or resume) every setting of ``config`` from one store; write the CSV and the figure."""
    if rank_info().is_distributed:
        raise ConfigError(
            "kdcache sweep runs in one process, not under torchrun; use --jobs J to train J "
            "settings side by side (torchrun is for dump-teacher, train and distill)"
        )
    first = config.stores[0]
    if modality(config.student, dataset=config.dataset, cache=first) == LM:
        what = (
            f"{first} is a token store"
            if is_sequence_store(first)
            else f"--student {config.student} is a language model"
        )
        raise ConfigError(
            f"sweep does not handle language models: {what}, whose runs report perplexity, "
            "while a sweep tabulates, plots and reuses runs by image accuracy and shares one "
            f"decoded image store between its --jobs; run `kdcache distill --cache {first} "
            "--student hf:PATH --loss L --temperature T --alpha A --out DIR` once per setting "
            "(docs/lm.md)"
        )
    refuse_foreign_options(config, IMAGE)
    runs = config.runs()
    # opened once, shared by every run
    readers = [open_store(store, memory_budget=config.cache_memory) for store in config.stores]
    reader = readers[0]
    dataset = store_dataset(reader, config.dataset, config.split)
    check_model(config.student, dataset)
    # Whatever a run would be refused for is refused here, before any worker starts.
    for member in readers[1:]:
        check_same_rows(reader, member, action="sweep over")
    for temperature in config.temperatures:
        for member in readers:
            member.encoding.check_distill_temperature(temperature, option="--temperatures")
    # The transfer set's check is strictest at the smallest alpha (labels needed below 1); the
    # other checks depend on the loss only.
    for loss in config.losses:
        run = min((run for run in runs if run.loss == loss), key=lambda run: run.alpha)
        run.check_loss(IMAGE)
        for member in readers:
            check_store_run(run, member, dataset)
    if not config.out.strip():
        raise ConfigError("the sweep folder is empty; pass --out FOLDER, e.g. --out runs/sweep")
    refuse_inside_store(config.out, "the sweep folder")
    out = Path(config.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise KdcacheError(
            f"cannot create sweep folder {out}: {error.strerror}; choose a writable --out"
        ) from None
    identity = _store_identity(readers, config)
    stores_text = ", ".join(config.stores)
    _claim_folder(out, identity, stores_text)
    record = {**config.to_dict(), "store_identity": identity}
    (out / "sweep.json").write_text(json.dumps(record, indent=2) + "\n")
    results: dict[str, RunResult] = {}
    for run in runs:
        kept = _finished_result(run)
        if kept is not None:
            log.info("%s: finished earlier, kept", os.path.basename(run.out))
            results[run.out] = kept
    skipped = len(results)
    todo = [run for run in runs if run.out not in results]
    if config.jobs > 1 and todo:
        private_folder()  # the workers inherit it, one made in place of a planted one included
    finished = (
        ((run, _run_and_save(run, readers)) for run in todo)
        if config.jobs == 1
        else run_concurrently(todo, jobs=config.jobs, task=_run_and_save)
    )
    for number, (run, result) in enumerate(finished, start=1):
        log.info("[%d/%d] %s: finished", number, len(todo), os.path.basename(run.out))
        results[run.out] = result
        rows = [_row(r, results[r.out]) for r in runs if r.out in results]
        write_results_csv(rows, out / RESULTS_CSV)  # partial results survive an interrupted sweep
    done = len(todo)
    rows = [_row(run, results[run.out]) for run in runs]
    write_results_csv(rows, out / RESULTS_CSV)
    figure = plot_sweep(
        rows,
        out / SWEEP_FIGURE,
        title=f"{config.student} from {stores_text}",
        references=_teacher_references(readers),
    )
    return SweepResult(
        rows=rows,
        results_csv=str(out / RESULTS_CSV),
        figure=str(figure),
        runs_done=done,
        runs_skipped=skipped,
    )


def _teacher_references(readers: Sequence[StoreReader]) -> dict[str, float]:
    """Each cached teacher's accuracy against the labels stored with its logits, for the
    figure."""
    references = {}
    for reader in readers:
        accuracy, _ = teacher_statistics(reader)
        split = (reader.metadata.dataset or {}).get("split", "stored")
        spec = (reader.metadata.teacher or {}).get("spec")
        name = "teacher" if len(readers) == 1 else f"teacher {spec or reader.where}"
        if accuracy is not None:
            references[f"{name} on the {split} split"] = accuracy
    return references


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per setting: accuracies as mean ± std over its seeds, and the mean wall time."""
    by_setting: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_setting[row["setting"]].append(row)
    width = max([len("setting"), *map(len, by_setting)])
    lines = [
        f"{'setting':<{width}}  seeds  {'best val acc':>15}  {'final val acc':>15}  {'s/run':>6}"
    ]
    for setting, group in by_setting.items():
        best = _mean_std([r["best_val_acc"] for r in group])
        final = _mean_std([r["final_val_acc"] for r in group])
        seconds = sum(r["wall_time_s"] for r in group) / len(group)
        lines.append(
            f"{setting:<{width}}  {len(group):>5}  {best:>15}  {final:>15}  {seconds:>6.1f}"
        )
    return "\n".join(lines)


def _mean_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
