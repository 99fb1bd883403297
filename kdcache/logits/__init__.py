"""The maths of teacher logits: encodings of a row, the sparse form, fidelity, distillation losses.

This layer knows nothing of stores, datasets or training; everything above builds on it.
"""
