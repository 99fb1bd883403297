"""DistillKit's Parquet logit sets: imported into a token store, and a token store exported.

The synthetic sets are written the way DistillKit's sample_logits_vllm.py writes them (schema of
distillkit/sample_common.py, bytes of distillkit/compression/monotonic_logprobs.py and
bitpack.py), by an encoder written here from that code, independently of kdcache's decoder.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import assert_one_line_error, run_cli
from narrowing import sparse

from kdcache.errors import InvalidLogitsError, SpecError
from kdcache.store.bridges.distillkit import export_distillkit, import_distillkit
from kdcache.store.bridges.topk import IMPORTED_FROM_KEY
from kdcache.store.sequence import create_sequence_store, open_sequence_store
from kdcache.store.tools.verify import verify_store

VOCAB = 300
BINS: list[dict[str, Any]] = [
    {"scale_dtype": "float16", "element_bits": 4, "num_elements": 3},
    {"scale_dtype": "bfloat16", "element_bits": 1, "num_elements": 2},
]
#: DistillKit-style config: 2 exact values, a 3-term fit and two residual bins (one bfloat16).
CONFIG = {
    "d": VOCAB,
    "k": 8,
    "exact_k": 2,
    "exact_dtype": "float32",
    "polynomial_terms": [0, 1, "sqrt"],
    "term_dtype": "float32",
    "residual_bins": BINS,
    "delta_encoding": True,
    "error_diffusion": False,
    "normalize_t": False,
}


def msb_first(values: np.ndarray, bits: int) -> list[int]:
    """DistillKit's pack_to_bytes for one row of integers."""
    stream = "".join(format(int(v), f"0{bits}b") for v in values)
    stream += "0" * (-len(stream) % 8)
    return [int(stream[i : i + 8], 2) for i in range(0, len(stream), 8)]


def bfloat16_bytes(value: float) -> bytes:
    return torch.tensor([value], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()


def compress_row(log_probs: np.ndarray) -> tuple[list[int], np.ndarray]:
    """compress_monotonic_logprobs for one descending row of k log-probs: its bytes, and the
    values DistillKit's decompress_monotonic_logprobs gives back from them."""
    deltas = np.concatenate([log_probs[:1], np.diff(log_probs)]).astype(np.float32)
    out = deltas[:2].astype("<f4").tobytes()
    approx = deltas[2:].astype(np.float64)
    t = np.arange(approx.size, dtype=np.float64)
    terms = np.stack([t**0, t**1, np.sqrt(t)], axis=1)
    coefficients = np.linalg.lstsq(terms, approx, rcond=None)[0].astype(np.float32)
    out += coefficients.astype("<f4").tobytes()
    fit = terms.astype(np.float32) @ coefficients
    residual = approx - fit
    decoded = np.zeros_like(residual)
    start = 0
    for part in BINS:
        values = residual[start : start + part["num_elements"]]
        bits = part["element_bits"]
        largest = np.abs(values).max()
        quant = 1.0 if bits == 1 else 2.0 ** (bits - 1)
        scale = largest / quant if largest else 1.0
        if part["scale_dtype"] == "float16":
            out += np.float16(scale).astype("<f2").tobytes()
            stored = float(np.float16(scale))
        else:
            out += bfloat16_bytes(scale)
            stored = torch.tensor([scale], dtype=torch.bfloat16).float().item()
        low, high = (0, 1) if bits == 1 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        codes = np.clip(np.round(values / stored), low, high) - low
        out += bytes(msb_first(codes, bits))
        levels = codes * 2.0 - 1.0 if bits == 1 else codes + low
        decoded[start : start + part["num_elements"]] = levels * stored
        start += part["num_elements"]
    reconstructed = np.concatenate([deltas[:2], fit + decoded]).cumsum()
    return list(out), reconstructed


def teacher_rows(count: int, generator: np.random.Generator) -> torch.Tensor:
    return torch.log_softmax(torch.from_numpy(generator.normal(size=(count, VOCAB)) * 3), dim=1)


def write_set(folder, sequences, log_probs_per_sample, files: int = 2) -> list[np.ndarray]:
    """The set in ``folder``; returns each sample's log-probs as DistillKit decodes them."""
    folder.mkdir()
    (folder / "compression_config.yaml").write_text(yaml.safe_dump(CONFIG))
    bits = math.ceil(math.log2(VOCAB))
    schema = pa.schema(
        [
            pa.field("input_ids", pa.list_(pa.uint64())),
            pa.field("compressed_logprobs", pa.list_(pa.list_(pa.uint8()))),
            pa.field("bytepacked_indices", pa.list_(pa.list_(pa.uint8()))),
        ]
    )
    per_file = math.ceil(len(sequences) / files)
    decoded = []
    for number in range(files):
        rows: dict[str, list] = {name: [] for name in schema.names}
        for sample in range(number * per_file, min((number + 1) * per_file, len(sequences))):
            values, ids = log_probs_per_sample[sample].topk(CONFIG["k"], dim=1)
            rows["input_ids"].append(sequences[sample].tolist())
            packed = [compress_row(row.numpy()) for row in values]
            rows["compressed_logprobs"].append([data for data, _ in packed])
            decoded.append(np.stack([values for _, values in packed]))
            rows["bytepacked_indices"].append([msb_first(row.numpy(), bits) for row in ids])
        pq.write_table(pa.Table.from_pydict(rows, schema=schema), folder / f"data_{number}.parquet")
    return decoded


@pytest.fixture
def distillkit_set(tmp_path):
    generator = np.random.default_rng(4)
    sequences = [generator.integers(0, VOCAB, size=n) for n in (6, 3, 9, 5)]
    teacher = [teacher_rows(len(tokens) - 1, generator) for tokens in sequences]
    decoded = write_set(tmp_path / "set", sequences, teacher)
    return tmp_path / "set", sequences, teacher, decoded


def test_an_imported_set_holds_every_token_and_its_top_k_log_probs(tmp_path, distillkit_set):
    folder, sequences, teacher, decoded = distillkit_set
    result = import_distillkit(folder, tmp_path / "lm.zarr", teacher="qwen-synthetic")
    assert (result.num_samples, result.num_classes, result.encoding) == (4, VOCAB, "topk:8")
    store = open_sequence_store(tmp_path / "lm.zarr")
    assert verify_store(tmp_path / "lm.zarr").ok
    for sample, tokens in enumerate(sequences):
        np.testing.assert_array_equal(store.tokens(sample), tokens)
        rows = sparse(store.read([sample]))
        top, tail = rows.log_probs(1.0)
        values, ids = teacher[sample].topk(8, dim=1)
        # The store keeps its k values by value, the file by the teacher's rank: compare by id.
        # They are what DistillKit decodes (its fitted and quantised ranks approximate the
        # teacher's); the missing mass is kept at T = 1, spread evenly.
        stored = np.argsort(rows.indices.numpy(), axis=1)
        expected = np.argsort(ids.numpy(), axis=1)
        np.testing.assert_array_equal(
            np.take_along_axis(rows.indices.numpy(), stored, 1),
            np.take_along_axis(ids.numpy(), expected, 1),
        )
        got = np.take_along_axis(top.numpy(), stored, 1)
        np.testing.assert_allclose(got, np.take_along_axis(decoded[sample], expected, 1), atol=2e-3)
        np.testing.assert_allclose(top[:, 0].numpy(), values[:, 0].numpy(), atol=2e-3)
        missing = 1 - top.exp().sum(dim=1)
        np.testing.assert_allclose(tail.exp().numpy(), missing.numpy(), atol=1e-3)
    origin = store.metadata.extra[IMPORTED_FROM_KEY]
    assert origin["format"] == "distillkit"
    assert origin["compression_config"]["residual_bins"][1]["scale_dtype"] == "bfloat16"
    assert store.metadata.teacher == {"spec": "qwen-synthetic", "weights_sha256": None}


def test_a_token_store_exports_to_distillkit_and_imports_back_unchanged(tmp_path):
    generator = np.random.default_rng(2)
    sequences = [generator.integers(0, 90, size=n) for n in (7, 2, 4)]
    writer = create_sequence_store(
        tmp_path / "lm.zarr", sequences=sequences, vocab_size=90, encoding="topk:5", chunk_rows=4
    )
    writer.write(np.arange(3), (generator.normal(size=(10, 90)) * 4).astype(np.float32))
    writer.finalize()
    exported = export_distillkit(tmp_path / "lm.zarr", tmp_path / "dk", rows_per_file=2)
    assert (exported.num_files, exported.k) == (2, 5)
    table = pq.read_table(tmp_path / "dk" / "data_0.parquet")
    assert table.column_names == ["input_ids", "compressed_logprobs", "bytepacked_indices"]
    config = yaml.safe_load((tmp_path / "dk" / "compression_config.yaml").read_text())
    assert (config["d"], config["k"], config["exact_k"], config["delta_encoding"]) == (
        90,
        5,
        5,
        False,
    )
    import_distillkit(tmp_path / "dk", tmp_path / "back.zarr")
    source, back = (
        open_sequence_store(tmp_path / "lm.zarr"),
        open_sequence_store(tmp_path / "back.zarr"),
    )
    for sample in range(3):
        np.testing.assert_array_equal(back.tokens(sample), sequences[sample])
    before, after = sparse(source.read(range(3))), sparse(back.read(range(3)))
    np.testing.assert_array_equal(after.indices.numpy(), before.indices.numpy())
    for temperature in (1.0,):
        np.testing.assert_allclose(
            after.log_probs(temperature)[0].numpy(),
            before.log_probs(temperature)[0].numpy(),
            atol=1e-3,
        )


def test_bad_sets_are_refused_and_leave_nothing(tmp_path, distillkit_set):
    folder, _, _, _ = distillkit_set
    with pytest.raises(InvalidLogitsError, match="beyond the vocabulary of 100"):
        import_distillkit(folder, tmp_path / "small.zarr", vocab_size=100)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "compression_config.yaml").write_text(yaml.safe_dump(CONFIG))
    pq.write_table(
        pa.table(
            {
                "input_ids": [[1, 2]],
                "packed_indices": [[[3]]],
                "exact_values": [[[0.5]]],
                "coeffs": [[[0.1]]],
            }
        ),
        legacy / "data_0.parquet",
    )
    with pytest.raises(SpecError, match="legacy layout"):
        import_distillkit(legacy, tmp_path / "legacy.zarr")
    config = dict(CONFIG, k=7)
    (folder / "compression_config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SpecError, match="its compression config says"):
        import_distillkit(folder, tmp_path / "wrong.zarr")
    assert not any(p.suffix == ".zarr" for p in tmp_path.iterdir())


def test_the_commands_import_and_export_and_refuse_in_one_line(tmp_path, distillkit_set):
    folder, _, _, _ = distillkit_set
    done = run_cli("import", "distillkit", str(folder), "--out", str(tmp_path / "lm.zarr"))
    assert "4 sequences" in done.stdout
    out = tmp_path / "again"
    done = run_cli("export", "distillkit", str(tmp_path / "lm.zarr"), str(out))
    assert "top-8 log-probs per token" in done.stdout
    assert (out / "compression_config.yaml").exists()
    refused = run_cli("export", "distillkit", str(tmp_path / "lm.zarr"), str(out), check=False)
    assert_one_line_error(refused, "already exists")
