"""Language-model runs: next-token training and token-level distillation of a causal LM.

The same loop as the image runs (:func:`~kdcache.train.fit.fit`) with a
:class:`~kdcache.train.tasks.TokenTask`; this module resolves the text datasets (from a store's
record or the options), checks a store against the student, and writes ``config.json``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from kdcache._version import __version__
from kdcache.config import DistillConfig, TrainConfig
from kdcache.distributed import RankSession
from kdcache.errors import DatasetNotFoundError, StoreMismatchError
from kdcache.lm.fingerprint import (
    compare_lm_fingerprints,
    compare_tokenizers,
    lm_fingerprint,
    tokenizer_fingerprint,
)
from kdcache.lm.models import CausalLM, check_dataset_fits, load_causal_lm
from kdcache.lm.text import TokenDataset, build_text_dataset, parse_text_spec
from kdcache.logits.losses import construct
from kdcache.logits.sequence_losses import TOKEN_LOSSES
from kdcache.store.sequence import SequenceReader, open_sequence_store
from kdcache.train.fit import RunResult, fit, held_out_split
from kdcache.train.resume import start_run_folder
from kdcache.train.tasks import NextToken, TokenDistillation, TokenTask
from kdcache.train.teachers import LiveTokens, StoreTokens, TeacherSource


def _resolved(config: TrainConfig | DistillConfig, session: RankSession, command: str) -> dict:
    return {
        "command": command,
        "device": str(session.device),
        "kdcache_version": __version__,
        "ranks": session.info.world_size,  # --batch-size is per rank
    }


def _prepare_out(config: TrainConfig | DistillConfig, session: RankSession, resolved: dict) -> Path:
    session.on_main(lambda: start_run_folder(config, marker=TokenTask.finished_marker, **resolved))
    return Path(config.out)


def train_tokens(config: TrainConfig, session: RankSession) -> RunResult:
    """Next-token cross-entropy training of causal LM ``config.model`` on ``config.dataset``."""
    student = load_causal_lm(config.model, seed=config.seed)
    train_set, val_set = (
        build_text_dataset(
            config.dataset,
            split=split,
            tokenizer=student.tokenizer,
            train_on=config.train_on,
            pack=config.pack,
        )
        for split in (config.split, held_out_split(config.split))
    )
    for dataset in (train_set, val_set):
        check_dataset_fits(student, dataset)
    out = _prepare_out(config, session, _resolved(config, session, "train"))
    return fit(
        task=NextToken(student),
        train_set=train_set,
        val_set=val_set,
        config=config,
        out=out,
        session=session,
    )


def check_lm_store(
    store: SequenceReader, student: CausalLM, dataset: TokenDataset, *, recorded_text: bool = False
) -> None:
    """Refuse a store whose tokenizer, text or vocabulary differ from the student's and dataset's,
    naming the part that differs. The text is matched by its content fingerprint, wherever the
    file is now; ``recorded_text`` says the dataset is the one the store records (no --dataset),
    so a difference means the file changed since the dump."""
    recorded = (store.metadata.dataset or {}).get("fingerprint") or {}
    actual = lm_fingerprint(student.tokenizer, dataset)
    tokenizer = compare_tokenizers(recorded.get("tokenizer", {}), actual["tokenizer"])
    if tokenizer:
        raise StoreMismatchError(
            f"{store.where} was dumped with another tokenizer than student {student.spec}'s: "
            + "; ".join(tokenizer)
            + "; give the student the teacher's tokenizer"
        )
    fitted_to(student, store.vocab_size, store.where)
    differences = compare_lm_fingerprints(recorded, actual)
    if differences and recorded_text:
        path, _ = parse_text_spec(dataset.spec)
        raise StoreMismatchError(
            f"{path} changed since {store.where} was dumped from it ({dataset.split}): "
            + "; ".join(differences)
            + "; restore the original text, or pass --dataset text:FILE naming a copy of it"
        )
    if differences:
        raise StoreMismatchError(
            f"{store.where} was not dumped from dataset {dataset.spec!r} ({dataset.split}): "
            + "; ".join(differences)
            + "; use the text, max length and split the store was dumped from"
        )


def _stored_data(config: DistillConfig, store: SequenceReader) -> tuple[str, bool, str, bool]:
    """The run's --train-on and --pack (given, else the store's) and the store's own; a run
    the store's rows cannot serve is refused, naming the difference."""
    data = ((store.metadata.dataset or {}).get("fingerprint") or {}).get("data") or {}
    stored_on, stored_pack = str(data.get("train_on", "all")), bool(data.get("packed"))
    train_on = config.train_on or stored_on
    pack = config.pack or stored_pack
    if pack != stored_pack:
        raise StoreMismatchError(
            f"{store.where} was dumped without --pack (one document per sequence), so its rows "
            "are not those of packed sequences; drop --pack, or dump again with --pack"
        )
    if train_on == "all" and stored_on == "assistant":
        raise StoreMismatchError(
            f"{store.where} holds the teacher's rows at assistant tokens only (dumped with "
            "--train-on assistant), so it cannot train on all tokens; drop --train-on all, or "
            "dump again with --train-on all"
        )
    return train_on, pack, stored_on, stored_pack


def fitted_to(student: CausalLM, vocab_size: int, teacher: str) -> CausalLM:
    """``student`` with its logits cut to the teacher's ``vocab_size`` columns.

    Teacher and student share a tokenizer (checked before) but their heads may be padded
    differently beyond it (a teacher's padded columns are dropped at dump time): any head that
    covers the tokenizer and the teacher's columns distills from the same first ``vocab_size``
    columns. A head narrower than that is refused in one line."""
    if not student.vocab_size <= vocab_size <= student.head_size:
        raise StoreMismatchError(
            f"student {student.spec} predicts {student.vocab_size} tokens but {teacher} holds "
            f"{vocab_size}; size the student's output (vocab_size) to the teacher's"
        )
    return dataclasses.replace(student, vocab_size=vocab_size)


def _from_store(
    config: DistillConfig, store: SequenceReader, student: CausalLM, resolved: dict
) -> tuple[TeacherSource, TokenDataset]:
    store.store.encoding.check_distill_temperature(config.temperature)
    recorded = store.metadata.dataset or {}
    spec = config.dataset or recorded.get("spec")
    split = config.split or recorded.get("split") or "train"
    if spec is None:
        raise StoreMismatchError(
            f"{store.where} records no dataset; pass --dataset text:FILE (and --split)"
        )
    train_on, pack, stored_on, stored_pack = _stored_data(config, store)
    try:
        as_stored = build_text_dataset(
            spec, split=split, tokenizer=student.tokenizer, train_on=stored_on, pack=stored_pack
        )
    except DatasetNotFoundError:
        if config.dataset is not None:
            raise
        path, _ = parse_text_spec(spec)
        raise DatasetNotFoundError(
            f"{store.where} was dumped from {path}, which is not there now (looked for from "
            f"{Path.cwd()}); pass --dataset text:FILE naming that text where it is now "
            "(it is matched by content)"
        ) from None
    as_recorded = config.dataset is None and split == recorded.get("split", "train")
    check_lm_store(store, student, as_stored, recorded_text=as_recorded)
    store.store.load()
    resolved["store"] = store.metadata.to_dict()
    if train_on == stored_on:
        return StoreTokens(store, temperature=config.temperature), as_stored
    # Every position stored, the assistant's counted: each kept piece's rows are read at its
    # counted positions of the piece it was among all of them.
    train_set = build_text_dataset(
        spec, split=split, tokenizer=student.tokenizer, train_on=train_on, pack=pack
    )
    assert train_set.pieces is not None
    teacher = StoreTokens(store, temperature=config.temperature, samples=train_set.pieces)
    return teacher, train_set


def _from_live_teacher(
    config: DistillConfig, session: RankSession, student: CausalLM, resolved: dict
) -> tuple[TeacherSource, TokenDataset]:
    assert config.teacher is not None
    assert config.dataset is not None
    teacher = load_causal_lm(config.teacher, device=session.device)
    teacher.model.eval().requires_grad_(False)
    differences = compare_tokenizers(
        tokenizer_fingerprint(teacher.tokenizer), tokenizer_fingerprint(student.tokenizer)
    )
    if differences:
        raise StoreMismatchError(
            f"teacher {teacher.spec} and student {student.spec} tokenize differently: "
            + "; ".join(differences)
            + "; give the student the teacher's tokenizer"
        )
    train_set = build_text_dataset(
        config.dataset,
        split=config.split or "train",
        tokenizer=teacher.tokenizer,
        train_on=config.train_on or "all",
        pack=config.pack,
    )
    check_dataset_fits(teacher, train_set)
    fitted_to(student, teacher.vocab_size, f"teacher {teacher.spec}")
    resolved["teacher_weights_sha256"] = teacher.weights_sha256
    return LiveTokens(teacher, amp=config.amp), train_set


def distill_tokens(
    config: DistillConfig, session: RankSession, *, store: SequenceReader | None
) -> RunResult:
    """Token-level distillation of causal LM ``config.student`` from a sequence store (``store``
    is ``config.cache`` already opened, or None) or a live teacher."""
    student = load_causal_lm(config.student, seed=config.seed)
    criterion = construct(TOKEN_LOSSES[config.loss], config.loss_options())
    resolved = _resolved(config, session, "distill")
    if config.cache is not None:
        store = store or open_sequence_store(config.stores[0], memory_budget=config.cache_memory)
        teacher, train_set = _from_store(config, store, student, resolved)
        student = fitted_to(student, store.vocab_size, store.where)
    else:
        teacher, train_set = _from_live_teacher(config, session, student, resolved)
        assert isinstance(teacher, LiveTokens)
        student = fitted_to(student, teacher.teacher.vocab_size, config.teacher or "")
    resolved.update(
        dataset=train_set.spec,
        split=train_set.split,
        train_on=train_set.train_on,
        pack=train_set.packed,
    )
    val_set = build_text_dataset(
        train_set.spec,
        split=held_out_split(train_set.split),
        tokenizer=student.tokenizer,
        train_on=train_set.train_on,
        pack=train_set.packed,
    )
    for dataset in (train_set, val_set):
        check_dataset_fits(student, dataset)
    out = _prepare_out(config, session, resolved)
    return fit(
        task=TokenDistillation(student, criterion=criterion),
        train_set=train_set,
        val_set=val_set,
        config=config,
        out=out,
        session=session,
        teacher=teacher,
    )
