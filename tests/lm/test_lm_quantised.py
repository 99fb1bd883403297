"""A token store whose kept values are BITS-bit codes (topk:K:BITS): dumped, checked against the
plain topk:K store of the same teacher, converted, inspected, verified and distilled."""

from __future__ import annotations

import torch
from conftest import run_cli
from lm_fixtures import lm_files_fixture  # noqa: F401  (provides the lm_files fixture)
from narrowing import present, sparse

from kdcache.config import DumpConfig
from kdcache.lm.dump import dump_lm
from kdcache.store.sequence import open_sequence_store
from kdcache.store.tools.convert import convert_store
from kdcache.store.tools.report import inspect_store
from kdcache.store.tools.verify import verify_store


def test_a_quantised_token_store_dumps_reads_converts_and_distills(tmp_path, lm_files):
    stores = {}
    for encoding in ("topk:6", "topk:6:8"):
        stores[encoding] = tmp_path / f"{encoding.replace(':', '-')}.zarr"
        dump_lm(
            DumpConfig(
                teacher=f"hf:{lm_files['teacher']}",
                dataset=f"text:{lm_files['corpus']}:16",
                out=str(stores[encoding]),
                encoding=encoding,
                batch_size=16,
            )
        )
    plain, coded = (open_sequence_store(stores[e]) for e in ("topk:6", "topk:6:8"))
    assert coded.store.metadata.encoding == "topk:6:8"
    every = range(plain.num_sequences)
    exact, quantised = sparse(plain.read(every)), sparse(coded.read(every))
    torch.testing.assert_close(quantised.indices, exact.indices)
    torch.testing.assert_close(
        quantised.tail - quantised.values[:, :1],
        exact.tail - exact.values[:, :1],
        atol=1e-5,
        rtol=0,
    )
    # 8-bit codes on the row's own depth: a few hundredths of a nat from the float16 offsets.
    offsets = [rows.values - rows.values[:, :1] for rows in (quantised, exact)]
    assert (offsets[0] - offsets[1]).abs().max() < 0.05
    kl = [present(reader.store.metadata.fidelity)["mean_kl"][0] for reader in (coded, plain)]
    assert kl[0] <= kl[1] * 1.01 + 1e-4
    assert verify_store(stores["topk:6:8"]).ok
    report = inspect_store(stores["topk:6:8"])
    assert (report.encoding, report.complete) == ("topk:6:8", True)
    converted = convert_store(stores["topk:6"], tmp_path / "c.zarr", encoding="topk:4:4")
    assert converted.encoding == "topk:4:4"
    assert sparse(open_sequence_store(tmp_path / "c.zarr").read(every)).values.shape[1] == 4
    run_cli(
        "distill",
        "--cache",
        str(stores["topk:6:8"]),
        "--student",
        f"hf:{lm_files['student']}",
        "--epochs",
        "1",
        "--temperature",
        "2",
        "--out",
        str(tmp_path / "run"),
    )
    assert (tmp_path / "run" / "last" / "model.safetensors").exists()
