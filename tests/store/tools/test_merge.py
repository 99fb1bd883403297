"""kdcache merge: one store of an ensemble of teachers over the same dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli
from narrowing import dense, present

from kdcache import create_store, open_store
from kdcache.errors import ConfigError, StoreExistsError, StoreIncompleteError, StoreMismatchError
from kdcache.logits.ensemble import ENSEMBLE_KEY
from kdcache.store.sequence import create_sequence_store, open_sequence_store
from kdcache.store.tools.merge import merge_stores
from kdcache.store.tools.verify import verify_store

DATASET = {"spec": "digits", "split": "train", "fingerprint": {"num_samples": 40}}
N, C = 40, 12


def teacher_logits(seed: int, rows: int = N, classes: int = C) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(rows, classes)) * 3).astype(np.float32)


def write_store(path, logits, *, encoding="float32", chunk_rows=8, **options):
    settings = dict(
        num_samples=len(logits),
        num_classes=logits.shape[1],
        encoding=encoding,
        labels=np.arange(len(logits)) % logits.shape[1],
        chunk_rows=chunk_rows,
        teacher={"spec": f"cnn:{chunk_rows}", "weights_sha256": None},
        dataset=DATASET,
    )
    settings.update(options)
    writer = create_store(path, **settings)
    writer.write(np.arange(len(logits)), logits)
    writer.finalize()
    return path


@pytest.fixture
def three(tmp_path):
    """Three float32 teachers' stores over one dataset, chunked differently."""
    logits = [teacher_logits(seed) for seed in range(3)]
    paths = [
        write_store(tmp_path / f"t{seed}.zarr", rows, chunk_rows=6 + 5 * seed)
        for seed, rows in enumerate(logits)
    ]
    return paths, logits


def read_all(path, temperature=None) -> torch.Tensor:
    return open_store(path).read_dense(np.arange(N), temperature=temperature)


def test_dense_stores_merge_exactly_in_both_modes(tmp_path, three):
    paths, logits = three
    mean = merge_stores(paths, tmp_path / "mean.zarr", weights=[2, 1, 1], chunk_rows=16)
    assert (mean.encoding, mean.weights, mean.num_samples) == ("float32", (0.5, 0.25, 0.25), N)
    z = torch.from_numpy(np.stack(logits))
    expected = z[0] * 0.5 + z[1] * 0.25 + z[2] * 0.25
    assert torch.equal(read_all(tmp_path / "mean.zarr"), expected)
    mixture = merge_stores(paths, tmp_path / "mix.zarr", mode="mixture", temperature=4.0)
    probs = torch.softmax(z.double() / 4.0, dim=2).mean(dim=0)
    got = torch.softmax(read_all(tmp_path / "mix.zarr").double() / 4.0, dim=1)
    torch.testing.assert_close(got, probs, rtol=1e-5, atol=1e-7)
    assert present(mixture.fidelity).kl_at(4.0) == 0.0
    for path in ("mean.zarr", "mix.zarr"):
        assert verify_store(tmp_path / path).ok
    merged = open_store(tmp_path / "mix.zarr")
    np.testing.assert_array_equal(merged.labels, np.arange(N) % C)
    assert merged.metadata.dataset == DATASET
    assert merged.metadata.teacher == {
        "spec": "ensemble:mixture(cnn:6, cnn:11, cnn:16)",
        "weights_sha256": None,
    }
    record = merged.metadata.extra[ENSEMBLE_KEY]
    assert (record["mode"], record["temperature"]) == ("mixture", 4.0)
    assert [s["content_sha256"] for s in record["sources"]] == [
        open_store(p).content_digest() for p in paths
    ]
    assert [s["generation"] for s in record["sources"]] == [
        open_store(p).metadata.generation for p in paths
    ]


def test_topk_stores_merge_into_their_union_with_an_exact_tail(tmp_path, three):
    _paths, logits = three
    sparse = [
        write_store(tmp_path / f"top{i}.zarr", rows, encoding="topk:3")
        for i, rows in enumerate(logits)
    ]
    for temperature in (1.0, 4.0):
        # What the sources say at T: each one's top-3 plus its tail's mass spread uniformly.
        sources = torch.stack([read_all(p, temperature) for p in sparse]).double()
        mixture = torch.softmax(sources / temperature, dim=2).mean(dim=0)
        out = tmp_path / f"union-T{temperature:g}.zarr"
        result = merge_stores(sparse, out, mode="mixture", temperature=temperature)
        assert result.encoding == "topk:9"  # the whole union, by default
        got = torch.softmax(read_all(out, temperature).double() / temperature, dim=1)
        kl = (mixture * (mixture.log() - got.log())).sum(dim=1).mean().item()
        assert kl < 1e-5, kl  # float16 offsets only
        top = merge_stores(
            sparse,
            tmp_path / f"top5-T{temperature:g}.zarr",
            mode="mixture",
            temperature=temperature,
            top_k=5,
        )
        got = torch.softmax(
            read_all(tmp_path / f"top5-T{temperature:g}.zarr", temperature).double() / temperature,
            dim=1,
        )
        smaller = (mixture * (mixture.log() - got.log())).sum(dim=1).mean().item()
        assert kl < smaller < 0.1
        assert top.encoding == "topk:5"
        assert verify_store(out).ok
    mean = merge_stores(sparse, tmp_path / "mean.zarr", encoding="float16")
    assert (
        open_store(tmp_path / "mean.zarr").metadata.extra[ENSEMBLE_KEY]["tail_fill_temperature"]
        == 1.0
    )
    assert mean.encoding == "float16"


def test_topk_stores_merge_into_a_quantised_union_within_its_codes_error(tmp_path):
    logits = [teacher_logits(seed, classes=40) for seed in range(3)]
    sparse = [
        write_store(tmp_path / f"top{i}.zarr", rows, encoding="topk:6")
        for i, rows in enumerate(logits)
    ]
    for temperature in (1.0, 4.0):
        sources = torch.stack([read_all(p, temperature) for p in sparse]).double()
        mixture = torch.softmax(sources / temperature, dim=2).mean(dim=0)
        kls = {}
        for bits in (8, 3):
            out = tmp_path / f"union{bits}-T{temperature:g}.zarr"
            result = merge_stores(sparse, out, mode="mixture", temperature=temperature, bits=bits)
            assert result.encoding == f"topk:18:{bits}"  # the whole union, its values coded
            assert verify_store(out).ok
            got = torch.softmax(read_all(out, temperature).double() / temperature, dim=1)
            kls[bits] = (mixture * (mixture.log() - got.log())).sum(dim=1).mean().item()
        assert kls[8] < 1e-4 < kls[3] < 0.1, kls
    smaller = merge_stores(sparse, tmp_path / "k10.zarr", mode="mixture", top_k=10, bits=6)
    assert smaller.encoding == "topk:10:6"
    with pytest.raises(ConfigError, match=r"--bits must be an integer in \[2, 8\], got 9"):
        merge_stores(sparse, tmp_path / "bad.zarr", bits=9)
    with pytest.raises(ConfigError, match="--bits 8 and --encoding topk:5 both choose"):
        merge_stores(sparse, tmp_path / "bad.zarr", encoding="topk:5", bits=8)
    dense_sources = [
        write_store(tmp_path / f"d{i}.zarr", rows) for i, rows in enumerate(logits[:2])
    ]
    with pytest.raises(ConfigError, match="the sources are dense"):
        merge_stores(dense_sources, tmp_path / "bad.zarr", bits=8)
    assert not (tmp_path / "bad.zarr").exists()


def test_sampled_stores_merge_as_a_mixture_at_t1_only(tmp_path, three):
    _paths, logits = three
    drawn = [
        write_store(tmp_path / f"s{i}.zarr", rows, encoding="sampled:6")
        for i, rows in enumerate(logits)
    ]
    result = merge_stores(drawn, tmp_path / "mix.zarr", mode="mixture")
    assert result.encoding == "topk:11"  # 3 x 6 draws, at most C - 1 classes
    shares = torch.stack([torch.softmax(read_all(p), dim=1) for p in drawn]).mean(dim=0)
    got = torch.softmax(read_all(tmp_path / "mix.zarr", 1.0), dim=1)
    torch.testing.assert_close(got, shares, atol=1e-3, rtol=0)
    with pytest.raises(ConfigError, match="draws at T = 1"):
        merge_stores(drawn, tmp_path / "mean.zarr")
    with pytest.raises(ConfigError, match="temperature"):
        merge_stores(drawn, tmp_path / "t4.zarr", mode="mixture", temperature=4.0)
    assert not (tmp_path / "mean.zarr").exists()
    assert not (tmp_path / "t4.zarr").exists()


def views_store(path, *, seed: int, params_seed: int = 0):
    views = 3
    params = np.random.default_rng(params_seed).random((N, views, 4)).astype(np.float32)
    augment = {
        "recipe": "rrc+flip",
        "seed": 2,
        "fields": ["a", "b", "c", "d"],
        "input_size": [8, 8],
    }
    return write_store(
        path,
        teacher_logits(seed, N * views),
        num_samples=N,
        labels=np.arange(N) % C,
        views=views,
        augment=augment,
        view_params=params,
    )


def test_views_stores_merge_when_their_views_are_the_same(tmp_path):
    a = views_store(tmp_path / "a.zarr", seed=0)
    b = views_store(tmp_path / "b.zarr", seed=1)
    result = merge_stores([a, b], tmp_path / "ab.zarr")
    merged = open_store(tmp_path / "ab.zarr")
    assert result.views == merged.views == 3
    np.testing.assert_array_equal(present(merged.view_params), present(open_store(a).view_params))
    rows = np.arange(N * 3)
    expected = dense(open_store(a).read(rows)) * 0.5 + dense(open_store(b).read(rows)) * 0.5
    assert torch.equal(dense(merged.read(rows)), expected)
    other = views_store(tmp_path / "other.zarr", seed=1, params_seed=5)
    with pytest.raises(StoreMismatchError, match="in its view parameters"):
        merge_stores([a, other], tmp_path / "bad.zarr")
    assert not (tmp_path / "bad.zarr").exists()


def token_store(path, *, seed: int, lengths=(5, 2, 9, 4)):
    generator = np.random.default_rng(0)
    sequences = [generator.integers(0, 12, size=length) for length in lengths]
    writer = create_sequence_store(
        path,
        sequences=sequences,
        vocab_size=12,
        encoding="float16",
        chunk_rows=4,
        dataset={"spec": "text:notes.txt", "fingerprint": {"num_sequences": len(lengths)}},
    )
    writer.write(np.arange(len(lengths)), teacher_logits(seed, sum(lengths) - len(lengths)))
    writer.finalize()
    return path


def test_token_stores_merge_sequence_by_sequence(tmp_path):
    a = token_store(tmp_path / "a.zarr", seed=0)
    b = token_store(tmp_path / "b.zarr", seed=1)
    result = merge_stores([a, b], tmp_path / "ab.zarr", mode="mixture", temperature=2.0)
    assert (result.num_samples, result.encoding) == (4, "float16")
    merged, first, second = (
        open_sequence_store(tmp_path / p) for p in ("ab.zarr", "a.zarr", "b.zarr")
    )
    np.testing.assert_array_equal(merged.offsets, first.offsets)
    np.testing.assert_array_equal(merged.tokens(2), first.tokens(2))
    probs = (
        torch.softmax(dense(first.read(range(4))).double() / 2, dim=1)
        + torch.softmax(dense(second.read(range(4))).double() / 2, dim=1)
    ) / 2
    got = torch.softmax(dense(merged.read(range(4))).double() / 2, dim=1)
    torch.testing.assert_close(got, probs, atol=2e-3, rtol=0)  # float16 output
    assert verify_store(tmp_path / "ab.zarr").ok
    shorter = token_store(tmp_path / "c.zarr", seed=1, lengths=(5, 4, 9, 2))
    with pytest.raises(StoreMismatchError, match=r"differs from .* in its labels"):
        merge_stores([a, shorter], tmp_path / "bad.zarr")


def test_stores_on_object_storage_merge_into_object_storage(tmp_path, three, s3_bucket):
    paths, logits = three
    remote = f"{s3_bucket}/t1.zarr"
    merge_stores([paths[1], paths[1]], remote, weights=[1, 0])  # a copy of t1 up there
    result = merge_stores([paths[0], remote], f"{s3_bucket}/ens.zarr")
    assert result.nbytes is None
    assert result.source_nbytes[1] is None
    expected = torch.from_numpy(logits[0]) * 0.5 + torch.from_numpy(logits[1]) * 0.5
    assert torch.equal(read_all(f"{s3_bucket}/ens.zarr"), expected)
    assert verify_store(f"{s3_bucket}/ens.zarr").ok
    sources = open_store(f"{s3_bucket}/ens.zarr").metadata.extra[ENSEMBLE_KEY]["sources"]
    assert sources[1]["store"] == remote


def test_mismatched_or_bad_sources_are_refused_and_nothing_is_written(tmp_path, three):
    paths, logits = three
    out = tmp_path / "out.zarr"
    other_dataset = write_store(
        tmp_path / "d.zarr", logits[0], dataset={**DATASET, "spec": "digits:16"}
    )
    wider = write_store(tmp_path / "w.zarr", teacher_logits(0, N, C + 1))
    fewer = write_store(tmp_path / "f.zarr", logits[0][:30])
    relabelled = write_store(tmp_path / "l.zarr", logits[0], labels=np.zeros(N, dtype=int))
    cases = [
        ([paths[0], other_dataset], StoreMismatchError, "in its dataset record"),
        ([paths[0], wider], StoreMismatchError, "in its classes"),
        ([paths[0], fewer], StoreMismatchError, "in its rows"),
        ([paths[0], relabelled], StoreMismatchError, "in its labels"),
        ([paths[0]], ConfigError, "two or more stores"),
        ([paths[0], tmp_path / "missing.zarr"], Exception, "missing.zarr"),
    ]
    for sources, error, message in cases:
        with pytest.raises(error, match=message):
            merge_stores(sources, out)
        assert not out.exists()
    with pytest.raises(ConfigError, match="is one of the stores to merge"):
        merge_stores([paths[0], paths[1]], paths[1])
    with pytest.raises(ConfigError, match="3 weights for 2"):
        merge_stores(paths[:2], out, weights=[1, 1, 1])
    with pytest.raises(ConfigError, match="both choose the output encoding"):
        merge_stores(paths[:2], out, encoding="float16", top_k=4)
    unfinished = tmp_path / "u.zarr"
    create_store(unfinished, num_samples=N, num_classes=C, encoding="float32", dataset=DATASET)
    with pytest.raises(StoreIncompleteError):
        merge_stores([paths[0], unfinished], out)
    assert not out.exists()
    merge_stores(paths[:2], out)
    before = read_all(out)
    with pytest.raises(StoreExistsError):
        merge_stores(paths[1:], out)
    assert torch.equal(read_all(out), before)
    merge_stores(paths[1:], out, overwrite=True)
    assert not torch.equal(read_all(out), before)


def test_the_command_merges_and_refuses_in_one_line(tmp_path, three):
    paths, _ = three
    out = tmp_path / "cli.zarr"
    result = run_cli(
        "merge",
        *map(str, paths),
        "--out",
        str(out),
        "--mode",
        "mixture",
        "--temperature",
        "2",
        "--weights",
        "1,1,2",
        "--encoding",
        "float16",
    )
    assert result.returncode == 0, result.stderr
    assert "merged 3 stores (mixture at T=2, weights 0.25,0.25,0.5)" in result.stdout
    assert open_store(out).metadata.encoding == "float16"
    refused = run_cli("merge", str(paths[0]), "--out", str(tmp_path / "one.zarr"), check=False)
    assert_one_line_error(refused, "two or more stores")
    refused = run_cli(
        "merge",
        *map(str, paths),
        "--out",
        str(tmp_path / "t.zarr"),
        "--temperature",
        "0",
        check=False,
    )
    assert_one_line_error(refused, "temperature")
    assert not (tmp_path / "one.zarr").exists()
    assert not (tmp_path / "t.zarr").exists()
