"""The values the command line's options choose from, importable without torch.

The option declarations (:mod:`kdcache.config`) read these when the CLI loads; keeping them here
means ``kdcache --help`` does not pay the seconds torch takes to import. The registries that need
torch (encodings, dataset kinds, models, recipe operations) are declared once, in their own
modules; :class:`Registry` reads their names from those modules' source for the help text.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

#: The splits every dataset kind has; the other one validates.
SPLITS = ("train", "test")
#: What a dataset's items can hold: float32 images (the reference), uint8 images, or the encoded
#: image files (imagefolder only).
INPUT_FORMS = ("float32", "uint8", "jpeg")
#: The ``--inputs`` choices: a form, or ``auto`` (see
#: :func:`kdcache.data.device_input.resolve_inputs`).
INPUT_CHOICES = ("auto", *INPUT_FORMS)
#: ``--amp`` choices: the name of the torch dtype autocast computes in.
AMP_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
#: ``--lr-schedule`` choices: the learning rate's curve over a run (kdcache.train.optim).
LR_SCHEDULES = ("constant", "cosine")
#: ``--optimizer`` choices (kdcache.train.optim): Adam (AdamW with weight decay), or SGD with
#: Nesterov momentum.
OPTIMIZERS = ("adam", "sgd")
#: Views per sample a store may hold (FKD keeps a few hundred crops per image): the most
#: ``--views`` takes, and the most a store's record may say.
MAX_VIEWS = 1 << 16


@dataclass(frozen=True)
class Registry:
    """Where a registry is declared: the dict literal ``name`` in the module ``module``."""

    module: str
    name: str

    def names(self) -> tuple[str, ...]:
        """The registry's keys, in order."""
        return tuple(_declared_entries(self))

    def forms(self) -> tuple[str, ...]:
        """Each entry's first argument where it is a string literal (an encoding's form, e.g.
        ``topk:K``), else its key."""
        return tuple(first or name for name, first in _declared_entries(self).items())


#: The registries the command line's help lists, each declared once in a module that imports
#: torch: the help reads their keys from the source, without importing them.
ENCODINGS = Registry("kdcache.logits.encodings", "ENCODINGS")
DATASET_KINDS = Registry("kdcache.data.datasets.build", "DATASET_KINDS")
MODELS = Registry("kdcache.models", "MODELS")
RECIPE_OPERATIONS = Registry("kdcache.augment.recipe", "OPERATIONS")


@functools.cache
def _declared_entries(registry: Registry) -> dict[str, str | None]:
    # The path from the package folder: finding the module through importlib would import its
    # parent packages, and some of those import torch.
    source = Path(__file__).parent.joinpath(*registry.module.split(".")[1:]).with_suffix(".py")
    for node in ast.parse(source.read_text(), filename=str(source)).body:
        targets: list[ast.expr]
        if isinstance(node, ast.AnnAssign):
            targets, value = [node.target], node.value
        elif isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        else:
            continue
        if not any(isinstance(t, ast.Name) and t.id == registry.name for t in targets):
            continue
        if not isinstance(value, ast.Dict):
            break
        entries: dict[str, str | None] = {}
        for key, entry in zip(value.keys, value.values, strict=True):
            if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
                break
            first = entry.args[0] if isinstance(entry, ast.Call) and entry.args else None
            literal = isinstance(first, ast.Constant) and isinstance(first.value, str)
            entries[key.value] = first.value if literal else None  # type: ignore[union-attr]
        else:
            return entries
        break
    raise LookupError(
        f"{registry.module}.{registry.name} is not a dict literal with string keys: the command "
        "line's help reads its entries from the source"
    )


#: ``--train-on`` choices: which tokens of a language-model dataset the loss counts (assistant:
#: those of the assistant's turns in chat data).
TRAIN_ON = ("all", "assistant")
#: How an ensemble's teachers combine (``merge --mode``, ``distill --teacher-mix``): the mean of
#: their logits, or the mixture of their softmaxes at a temperature (kdcache.logits.ensemble).
ENSEMBLE_MODES = ("mean", "mixture")
