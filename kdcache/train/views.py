"""Training sets of augmented views for :mod:`kdcache.train.loop`: cached, online and CE runs.

A store with views dictates the recipe, the parameters and V; an online run draws the same
parameters from ``--augment``/``--augment-seed``, so for equal settings both runs feed the
student the same pixels in the same order and the teacher's logits on exactly those pixels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kdcache.augment.order import ViewSampler
from kdcache.augment.recipe import SAMPLER, Recipe, parse_recipe
from kdcache.augment.views import (
    BaseDataset,
    ViewDataset,
    ViewSource,
    input_size,
    recorded_recipe,
    sampler_of,
)
from kdcache.data.datasets import LabeledDataset
from kdcache.errors import StoreMismatchError
from kdcache.store.read.feed import Feed
from kdcache.store.read.reader import StoreReader
from kdcache.wording import counted

log = logging.getLogger("kdcache")


@dataclass(frozen=True)
class Views:
    """A run's training set of views, the sampler choosing each epoch's views, and their source."""

    dataset: ViewDataset
    sampler: ViewSampler
    source: ViewSource | None
    #: The generator that drew the views' parameters (a store's may predate the current one).
    drawn_by: str = SAMPLER

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        """Store rows (``sample * V + view``) of a batch's item indices."""
        return torch.from_numpy(self.dataset.rows(indices))

    def mixed_hard_loss(
        self, logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor | None:
        """``mean((1 - lam) * (CE(partner label) - CE(own label)))``: what turns a loss's hard
        term on the own labels into the mixed term ``lam * CE(own) + (1 - lam) * CE(partner)``;
        ``None`` when the recipe does not mix."""
        mix = None if self.source is None else self.source.mix_of(rows.numpy())
        if mix is None:
            return None
        partner, lam = mix
        partner_labels = torch.from_numpy(self.dataset.labels[partner]).to(labels.device)
        weight = torch.from_numpy(1.0 - lam).to(logits.device, logits.dtype)
        own = F.cross_entropy(logits, labels, reduction="none")
        other = F.cross_entropy(logits, partner_labels, reduction="none")
        return (weight * (other - own)).mean()


def _student_recipe(spec: str | None) -> Recipe | None:
    if spec is None:
        return None
    log.warning(
        "--student-augment %s changes the student's input after the teacher's logits were "
        "computed: teacher and student no longer see the same view (Beyer et al. 2022 found "
        "such inconsistency hurts); prefer a store dumped with --views V --augment RECIPE",
        spec,
    )
    return parse_recipe(spec)


def cached_views(
    reader: StoreReader,
    dataset: LabeledDataset,
    *,
    augment: str | None,
    augment_seed: int | None,
    views: int | None,
    student_augment: str | None,
    seed: int,
    feed: Feed,
) -> Views | None:
    """The views a store holds (``None`` for a plain store without student augmentation);
    refuses options that disagree with what the store was dumped with."""
    check_view_options(reader, augment=augment, augment_seed=augment_seed, views=views)
    meta = reader.metadata
    recorded = meta.augment
    source = stored_view_source(reader, dataset, described=f"dataset {dataset.spec!r}")
    if source is None and student_augment is None:
        return None
    student = _student_recipe(student_augment)
    return Views(
        dataset=ViewDataset(dataset, source, student=student, student_seed=seed),
        sampler=ViewSampler(
            num_samples=len(dataset),
            views=meta.views,
            seed=seed,
            feed=feed,
            with_epoch=student is not None,
        ),
        source=source,
        drawn_by=SAMPLER if recorded is None else sampler_of(recorded),
    )


def check_view_options(
    reader: StoreReader, *, augment: str | None, augment_seed: int | None, views: int | None
) -> None:
    """Refuse ``--augment``, ``--augment-seed`` or ``--views`` that disagree with what the store
    was dumped with (no view is read)."""
    meta = reader.metadata
    recorded = meta.augment
    where = reader.where
    if views is not None and views != meta.views:
        raise StoreMismatchError(
            f"{where} holds {counted(meta.views, 'view')} per sample but --views {views} was "
            "given; drop --views (the store decides) or dump again"
        )
    if augment is not None:
        wanted = parse_recipe(augment).spec
        have = None if recorded is None else recorded.get("recipe")
        if wanted != have:
            raise StoreMismatchError(
                f"{where} was dumped with recipe {have!r} but --augment {wanted!r} was given; "
                "drop --augment (the store's recipe is used) or dump with that recipe"
            )
    if augment_seed is not None and recorded is not None and augment_seed != recorded.get("seed"):
        raise StoreMismatchError(
            f"{where} was dumped with --augment-seed {recorded.get('seed')} but {augment_seed} "
            "was given; drop --augment-seed or dump again with that seed"
        )
    # --augment/--augment-seed claim the views an online run would draw: another generator's
    # views are other views.
    given = augment is not None or augment_seed is not None
    if recorded is not None and given and sampler_of(recorded) != SAMPLER:
        raise StoreMismatchError(
            f"{where}'s views were drawn by the generator {sampler_of(recorded)!r} but "
            f"--augment/--augment-seed draw them with {SAMPLER!r}, so an online run with these "
            "options sees other views; drop --augment and --augment-seed to distill on the "
            "store's own views, or dump the store again"
        )


def stored_view_source(
    reader: StoreReader, dataset: BaseDataset, *, described: str
) -> ViewSource | None:
    """The views a store's rows hold, recreated from its recorded recipe and parameters on
    ``dataset`` (``described`` in messages); ``None`` for a store of clean inputs."""
    meta, where = reader.metadata, reader.where
    recorded = meta.augment
    if recorded is None:
        if meta.views > 1:
            raise StoreMismatchError(
                f"{where} holds {meta.views} views per sample but records no recipe, so their "
                "inputs cannot be recreated; dump it with kdcache dump-teacher --augment"
            )
        return None
    params = reader.view_params
    if params is None:
        raise StoreMismatchError(
            f"{where} records the recipe {recorded.get('recipe')!r} but lacks its "
            "view_params array; run kdcache verify and dump again"
        )
    size = input_size(dataset)
    drawn_for = tuple(recorded.get("input_size") or size)
    if drawn_for != size:
        raise StoreMismatchError(
            f"{where}'s views were drawn for {drawn_for} inputs but {described} yields "
            f"{size}; use the dataset the store was dumped from"
        )
    recipe = recorded_recipe(recorded, where=where)
    return ViewSource(dataset, recipe, params, described=f"{where}'s view_params")


def drawn_views(
    dataset: LabeledDataset,
    *,
    augment: str | None,
    augment_seed: int | None,
    views: int | None,
    epochs: int,
    seed: int,
    student_augment: str | None = None,
) -> Views | None:
    """Views drawn like a dump's (online KD and CE training); ``None`` without augmentation.

    ``views`` defaults to ``epochs``: every epoch then sees a fresh view of every sample.
    """
    if augment is None and student_augment is None:
        return None
    source = None
    count = 1
    if augment is not None:
        count = views or epochs
        source = ViewSource.drawn(
            dataset, parse_recipe(augment), seed=augment_seed or 0, views=count
        )
    student = _student_recipe(student_augment)
    return Views(
        dataset=ViewDataset(dataset, source, student=student, student_seed=seed),
        sampler=ViewSampler(
            num_samples=len(dataset), views=count, seed=seed, with_epoch=student is not None
        ),
        source=source,
    )


def first_rows(dataset: LabeledDataset | ViewDataset, samples: np.ndarray) -> np.ndarray:
    """Row of each sample's first view (the sample index itself without views)."""
    return samples * getattr(dataset, "views", 1)
