"""Which runs are language-model runs: the CLI sends those here, everything else to images."""

from __future__ import annotations

from kdcache.lm.models import is_lm_model_spec
from kdcache.lm.text import is_text_spec
from kdcache.store.sequence import is_sequence_store


def is_lm_run(
    *, models: tuple[str | None, ...] = (), dataset: str | None = None, cache: str | None = None
) -> bool:
    """True when a model is ``hf:PATH``, the dataset is a text spec (``text:FILE``, ``jsonl:``,
    ``parquet:``, ``hfdisk:``) or the cache is a sequence store (opened only when the specs do
    not already tell)."""
    if is_text_spec(dataset) or any(is_lm_model_spec(spec) for spec in models):
        return True
    return cache is not None and is_sequence_store(cache)
