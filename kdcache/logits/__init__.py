"""The maths of teacher logits: encodings of a row, the sparse form, fidelity, distillation losses.

This layer knows nothing of stores, datasets or training; everything above builds on it.
"""

from kdcache.logits.encodings import Encoding, parse_encoding
from kdcache.logits.losses import AttentionLogitsLoss, FocalDistillationLoss, LogitsDistillationLoss
from kdcache.logits.sparse import SparseLogits

__all__ = [
    "AttentionLogitsLoss",
    "Encoding",
    "FocalDistillationLoss",
    "LogitsDistillationLoss",
    "SparseLogits",
    "parse_encoding",
]
