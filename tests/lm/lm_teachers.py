"""A module:function teacher for the tests: the tiny GPT-2 in FOLDER, failing on demand."""

from __future__ import annotations

import os

from torch import nn

#: Set by the tests: the save_pretrained folder to wrap, and after how many batches to fail.
FOLDER = ""
FAIL_AFTER: int | None = None


class Interrupted(RuntimeError):
    """Stands for a crash or a kill in the middle of a dump."""


class FlakyTeacher(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.batches = 0

    def forward(self, input_ids, attention_mask):
        if input_ids.shape[1] > 2:  # not the loader's probe
            self.batches += 1
            if FAIL_AFTER is not None and self.batches > FAIL_AFTER:
                raise Interrupted(f"interrupted after {FAIL_AFTER} batches")
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def flaky():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(FOLDER, local_files_only=True)
    return FlakyTeacher(model), AutoTokenizer.from_pretrained(FOLDER, local_files_only=True)


class _RecordingLM(nn.Module):
    """Appends ``EPOCH SEQUENCE`` for every training sequence to $KDCACHE_TEST_RECORD/rankR."""

    def __init__(self, inner: nn.Module) -> None:
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
