"""Fingerprints that tie a logit store to the dataset its logits were computed on."""

from __future__ import annotations

import hashlib

import numpy as np

from kdcache.data.datasets.labeled import LabeledDataset
from kdcache.errors import ConfigError


def dataset_fingerprint(dataset: LabeledDataset, *, num_input_samples: int = 16) -> dict:
    """Summarise a dataset's size, labels and a sample of its inputs, to detect a changed dataset.

    Inputs are hashed at ``num_input_samples`` evenly spaced indices including 0 and N-1.
    """
    if num_input_samples < 1:
        raise ConfigError(f"num_input_samples={num_input_samples} must be >= 1")
    n = len(dataset)
    k = min(num_input_samples, n)
    # A spacing of at least 1 (k <= n) keeps the floored indices distinct.
    indices = [0] if k == 1 else [i * (n - 1) // (k - 1) for i in range(k)]
    inputs = hashlib.sha256()
    for i in indices:
        x = dataset.float_input(i).detach().cpu().contiguous().numpy()
        inputs.update(np.ascontiguousarray(x, dtype="<f4").tobytes())
    labels = np.ascontiguousarray(dataset.labels, dtype="<i8")
    return {
        "num_samples": n,
        "num_classes": int(dataset.num_classes),
        "labels_sha256": hashlib.sha256(labels.tobytes()).hexdigest(),
        "inputs_sha256": inputs.hexdigest(),
        "input_indices": indices,
    }


def compare_fingerprints(expected: dict, actual: dict) -> list[str]:
    """List the differences between a store's fingerprint (expected) and a dataset's (actual).

    Only keys present in both are compared, since older stores may lack some.
    """
    diffs = [
        f"{key}: store has {expected[key]}, dataset has {actual[key]}"
        for key in ("num_samples", "num_classes")
        if key in expected and key in actual and expected[key] != actual[key]
    ]
    if "labels_sha256" in expected and "labels_sha256" in actual:
        old, new = expected["labels_sha256"], actual["labels_sha256"]
        if old != new:
            diffs.append(f"labels differ (sha256 {old[:12]}… vs {new[:12]}…)")
    if "inputs_sha256" in expected and "inputs_sha256" in actual:
        old_idx, new_idx = expected.get("input_indices"), actual.get("input_indices")
        if old_idx is not None and new_idx is not None and list(old_idx) != list(new_idx):
            # A different N already explains different indices; report only the unexplained case.
            if expected.get("num_samples") == actual.get("num_samples"):
                diffs.append(
                    f"inputs sampled at different indices (store hashed {len(old_idx)}, "
                    f"dataset {len(new_idx)}); fingerprint both with the same "
                    "num_input_samples"
                )
        elif expected["inputs_sha256"] != actual["inputs_sha256"]:
            diffs.append("inputs differ at the sampled indices")
    return diffs
