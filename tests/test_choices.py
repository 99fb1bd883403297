"""The command line's help lists each registry from its one declaration, read without torch."""

from __future__ import annotations

import pytest

from kdcache import choices
from kdcache.augment.recipe import OPERATIONS
from kdcache.data.datasets.build import DATASET_KINDS
from kdcache.logits.encodings import ENCODING_CHOICES, ENCODINGS
from kdcache.models import MODELS


@pytest.mark.parametrize(
    ("registry", "imported"),
    [
        (choices.ENCODINGS, ENCODINGS),
        (choices.DATASET_KINDS, DATASET_KINDS),
        (choices.MODELS, MODELS),
        (choices.RECIPE_OPERATIONS, OPERATIONS),
    ],
    ids=["encodings", "dataset kinds", "models", "recipe operations"],
)
def test_the_names_read_from_the_source_are_the_registry_keys(registry, imported):
    assert registry.names() == tuple(imported)


def test_the_encodings_forms_are_those_parse_encoding_names():
    assert choices.ENCODINGS.forms() == ENCODING_CHOICES


def test_a_registry_that_is_not_a_dict_literal_is_reported():
    with pytest.raises(LookupError, match=r"kdcache\.models\.TIMM_PREFIX is not a dict literal"):
        choices.Registry("kdcache.models", "TIMM_PREFIX").names()
