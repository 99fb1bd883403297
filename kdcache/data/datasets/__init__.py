"""Datasets named by a spec string, and fingerprints that tie a logit store to its dataset.

A spec is ``KIND`` or ``KIND:ARGS`` (see :data:`DATASET_KINDS`). Every dataset yields
``(x, y)`` with ``x`` a float32 tensor ``(C, H, W)`` and ``y`` an int, identically on every call,
because cached teacher logits are only valid for exactly the inputs they were computed on.
kdcache never downloads: datasets that need files must already be on disk. ``unlabeled:SPEC`` is
SPEC with every label -1, the label of a sample without one (an unlabeled transfer set).

Every kind can also yield its images as uint8 ``(C, H, W)`` (:meth:`LabeledDataset.with_inputs`),
a quarter of the bytes to move; :class:`PixelNormalization` then turns them into exactly the
float32 tensors above (the same operations in the same order), wherever it runs. ``imagefolder``
can yield the undecoded files too (``"jpeg"``), for decoding on the GPU.

Modules: :mod:`~kdcache.data.datasets.labeled` (:class:`LabeledDataset`),
:mod:`~kdcache.data.datasets.build`
(the spec dispatch, ``digits``, ``unlabeled``), :mod:`~kdcache.data.datasets.generated` (``fake``,
``synthetic``), :mod:`~kdcache.data.datasets.glyphs` and
:mod:`~kdcache.data.datasets.glyph_render` (``glyphs``, drawn from fonts and cached on disk),
:mod:`~kdcache.data.datasets.image_sets` (``imagefolder``, CIFAR, MNIST) and
:mod:`~kdcache.data.datasets.fingerprints`. This package re-exports their public names.
"""

from kdcache.data.datasets.build import DATASET_KINDS, build_dataset, labeled_spec
from kdcache.data.datasets.fingerprints import compare_fingerprints, dataset_fingerprint
from kdcache.data.datasets.generated import canonical_dataset_spec
from kdcache.data.datasets.labeled import LabeledDataset

__all__ = [
    "DATASET_KINDS",
    "LabeledDataset",
    "build_dataset",
    "canonical_dataset_spec",
    "compare_fingerprints",
    "dataset_fingerprint",
    "labeled_spec",
]
