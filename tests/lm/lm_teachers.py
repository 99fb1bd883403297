"""A module:function teacher for the tests: the tiny GPT-2 in FOLDER, failing on demand, noting
what each of its forward passes saw.

A test process sets FOLDER and FAIL_AFTER; a subprocess (a torchrun rank) reads them from the
environment variables KDCACHE_TEST_LM_FOLDER and KDCACHE_TEST_FAIL_AFTER.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from typing import TYPE_CHECKING

import torch
from teachers import halt_if_chosen
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: Set by the tests: the save_pretrained folder to wrap, and after how many batches to fail.
FOLDER = ""
FAIL_AFTER: int | None = None
#: One entry per teacher batch (the loader's probe excluded): what the forward pass saw.
SEEN: list[dict] = []


class Interrupted(RuntimeError):
    """Stands for a crash or a kill in the middle of a dump."""


@torch.compiler.disable
def note(input_ids: torch.Tensor, compiled: bool) -> None:
    """Record the batch and its surroundings (run eagerly even inside a compiled forward)."""
    SEEN.append(
        {
            "batch_size": input_ids.shape[0],
            "device": input_ids.device.type,
            "autocast": torch.is_autocast_enabled(input_ids.device.type),
            "compiled": compiled,
            "loader_workers": len(multiprocessing.active_children()),
            "writer_threads": sum(
                t.name.startswith("kdcache-writer-") for t in threading.enumerate()
            ),
        }
    )


class FlakyTeacher(nn.Module):
    def __init__(self, inner: nn.Module, fail_after: int | None) -> None:
        super().__init__()
        self.inner = inner
        self.fail_after = fail_after
        self.batches = 0

    def forward(self, input_ids, attention_mask):
        if input_ids.shape[1] > 2:  # not the loader's probe
            note(input_ids, torch.compiler.is_compiling())
            self.batches += 1
            if self.fail_after is not None and self.batches > self.fail_after:
                raise Interrupted(f"interrupted after {self.fail_after} batches")
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def flaky():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = FOLDER or os.environ["KDCACHE_TEST_LM_FOLDER"]
    fail_after = FAIL_AFTER
    if fail_after is None and "KDCACHE_TEST_FAIL_AFTER" in os.environ:
        fail_after = int(os.environ["KDCACHE_TEST_FAIL_AFTER"])
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    return FlakyTeacher(model, fail_after), AutoTokenizer.from_pretrained(
        folder, local_files_only=True
    )


class _RecordingLM(nn.Module):
    """Appends ``EPOCH SEQUENCE`` for every training sequence to $KDCACHE_TEST_RECORD/rankR."""

    def __init__(self, inner: PreTrainedModel) -> None:
        super().__init__()
        self.inner = inner
        self.epoch = 0
        self._was_training = False

    def forward(self, input_ids, attention_mask):
        if self.training:
            self.epoch += not self._was_training  # fit() switches to eval between epochs
            path = os.path.join(
                os.environ["KDCACHE_TEST_RECORD"], f"rank{os.environ.get('RANK', 0)}"
            )
            with open(path, "a") as stream:
                for ids, mask in zip(input_ids.cpu(), attention_mask.cpu(), strict=True):
                    stream.write(f"{self.epoch} {' '.join(map(str, ids[mask > 0].tolist()))}\n")
        self._was_training = self.training
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    def save_pretrained(self, folder) -> None:
        self.inner.save_pretrained(folder)


def recording():
    """A random causal LM from $KDCACHE_TEST_LM_FOLDER's config that records what it trains on."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = os.environ["KDCACHE_TEST_LM_FOLDER"]
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    return _RecordingLM(model), AutoTokenizer.from_pretrained(folder)


class _HaltingLM(nn.Module):
    def __init__(self, inner: PreTrainedModel) -> None:
        super().__init__()
        self.inner = inner
        self.training_passes = 0

    def forward(self, input_ids, attention_mask):
        if self.training:
            self.training_passes += 1
            halt_if_chosen(self.training_passes)
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    def save_pretrained(self, folder) -> None:
        self.inner.save_pretrained(folder)


def halting():
    """A random causal LM from $KDCACHE_TEST_LM_FOLDER's config that halts at a chosen training
    step (tests/teachers.py's ``halt_if_chosen``); without $KDCACHE_TEST_HALT_AT, that model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = os.environ["KDCACHE_TEST_LM_FOLDER"]
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    return _HaltingLM(model), AutoTokenizer.from_pretrained(folder)
