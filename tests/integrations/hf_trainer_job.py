"""One epoch of DistillationTrainer under torchrun, for tests/integrations/test_hf_trainer.py.

Usage: torchrun --nproc-per-node 2 hf_trainer_job.py STORE STUDENT_FOLDER OUT

Each rank writes OUT/rankR.json: the sample indices of the batches it collated (so whose rows it
read). The epoch covers the first multiple of 4 samples, so that 2 ranks of batch 2 split it
evenly and no sample is repeated to even them out.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, TrainingArguments

from kdcache.integrations.hf_trainer import DistillationTrainer, TokenStoreDataset
from kdcache.logits.sequence_losses import TokenDistillationLoss
from kdcache.store.sequence import open_sequence_store


def main(store_path: str, student: str, out: str) -> None:
    store = open_sequence_store(store_path)
    samples = store.num_sequences - store.num_sequences % 4
    seen: list[int] = []

    class Recording(DistillationTrainer):
        def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kw: Any) -> Any:
            seen.extend(inputs["sample_index"].tolist())
            return super().compute_loss(model, inputs, *args, **kw)

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(student))
    arguments = TrainingArguments(
        output_dir=str(Path(out) / "run"),
        per_device_train_batch_size=2,
        num_train_epochs=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = Recording(
        model,
        arguments,
        store=store,
        distillation_loss=TokenDistillationLoss(temperature=2.0),
        train_dataset=TokenStoreDataset(store, indices=range(samples)),
    )
    trainer.train()
    rank = int(os.environ["RANK"])
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(seen))
    # The Trainer leaves its process group open; torch's gloo threads torn down at interpreter
    # exit can abort a rank ("terminate called without an active exception", seen once in CI).
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
