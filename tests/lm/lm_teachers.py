"""A module:function teacher for the tests: the tiny GPT-2 in FOLDER, failing on demand."""

from __future__ import annotations

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
