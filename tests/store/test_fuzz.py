"""Property-based damage: every metadata field and every byte region of small real stores.

Whatever is changed, ``verify``, ``open_store`` (reading every row) and ``inspect`` either work
and return exactly the stored logits, or raise one :class:`KdcacheError` whose message is one
line; none of them writes anything to the store. The same holds for the arrays written once
beside the rows: a views store's ``view_params`` and a sequence store's ``offsets``,
``first_token`` and ``labels`` are read back exactly or refused, never as other values.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from narrowing import dense

from kdcache import create_store, open_store
from kdcache.errors import KdcacheError
from kdcache.store.sequence import create_sequence_store, open_sequence_store, sequence_offsets
from kdcache.store.tools.pack import pack_store
from kdcache.store.tools.report import inspect_store
from kdcache.store.tools.verify import verify_store

LOGITS = np.arange(36, dtype=np.float32).reshape(12, 3) / 7
FUZZ = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
#: Values a damaged or hostile zarr.json may hold in place of any field.
JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=12),
    st.sampled_from(["float16", "int8", "topk:2", "topk:99", "float64", "", "0", "1e20"]),
    st.lists(st.integers(-3, 50), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A complete float32 store (12 rows in chunks of 4) with labels, fingerprint and fidelity."""
    path = tmp_path_factory.mktemp("fuzz") / "s.zarr"
    writer = create_store(
        path,
        num_samples=12,
        num_classes=3,
        encoding="float32",
        chunk_rows=4,
        labels=np.arange(12) % 3,
        teacher={"spec": "mlp:128", "weights_sha256": None},
        dataset={"spec": "x", "split": "train", "fingerprint": {"num_samples": 12}},
    )
    writer.write(np.arange(12), LOGITS)
    writer.finalize()
    return path


def snapshot(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and not path.is_symlink()
    }


def exercise(path: Path) -> None:
    """Run verify, a full read and inspect; check the property described in the module doc."""
    before = (
        snapshot(path) if path.is_dir() else {"zip": hashlib.sha256(path.read_bytes()).hexdigest()}
    )
    for action in ("verify", "read", "inspect"):
        try:
            if action == "verify":
                verify_store(path).lines()
            elif action == "read":
                values = dense(open_store(path).read(np.arange(12))).numpy()
                np.testing.assert_array_equal(values, LOGITS)  # never silently other values
            else:
                inspect_store(path)
        except KdcacheError as error:
            assert "\n" not in str(error), str(error)  # noqa: PT017 - not every fuzzed action fails
    after = (
        snapshot(path) if path.is_dir() else {"zip": hashlib.sha256(path.read_bytes()).hexdigest()}
    )
    assert after == before


def damaged_copy(pristine: Path) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="kdcache-fuzz-"))
    return Path(shutil.copytree(pristine, folder / "s.zarr"))


def _set_path(record: dict, path: list[str], value, delete: bool) -> None:
    for key in path[:-1]:
        record = record[key]
    if delete:
        record.pop(path[-1], None)
    else:
        record[path[-1]] = value


def _field_paths(record: dict, prefix: tuple[str, ...] = ()) -> list[list[str]]:
    paths = []
    for key, value in record.items():
        paths.append([*prefix, key])
        if isinstance(value, dict) and len(prefix) < 2:
            paths += _field_paths(value, (*prefix, key))
    return paths


@FUZZ
@given(data=st.data(), delete=st.booleans(), value=JSON_VALUES)
def test_any_metadata_field_set_to_anything(pristine, data, delete, value):
    store = damaged_copy(pristine)
    try:
        document = json.loads((store / "zarr.json").read_text())
        record = document["attributes"]["kdcache"]
        path = data.draw(st.sampled_from(_field_paths(record)))
        _set_path(record, path, value, delete)
        (store / "zarr.json").write_text(json.dumps(document))
        exercise(store)
    finally:
        shutil.rmtree(store.parent)


@FUZZ
@given(
    data=st.data(),
    array=st.sampled_from(["logits", "labels", "chunk_written", "chunk_digests"]),
    delete=st.booleans(),
    value=JSON_VALUES,
)
def test_any_array_metadata_field_set_to_anything(pristine, data, array, delete, value):
    store = damaged_copy(pristine)
    try:
        path = store / array / "zarr.json"
        document = json.loads(path.read_text())
        field = data.draw(st.sampled_from(_field_paths(document)))
        _set_path(document, field, value, delete)
        path.write_text(json.dumps(document))
        exercise(store)
    finally:
        shutil.rmtree(store.parent)


@FUZZ
@given(
    data=st.data(),
    action=st.sampled_from(["flip", "overwrite", "truncate", "delete", "swap", "empty"]),
    start=st.floats(0, 1),
    length=st.integers(1, 64),
    noise=st.binary(min_size=1, max_size=64),
)
def test_any_byte_region_of_any_file(pristine, data, action, start, length, noise):
    store = damaged_copy(pristine)
    try:
        files = sorted(p for p in store.rglob("*") if p.is_file())
        target = data.draw(st.sampled_from(files))
        content = bytearray(target.read_bytes())
        offset = int(start * max(len(content) - 1, 0))
        if action == "flip" and content:
            for i in range(offset, min(offset + length, len(content))):
                content[i] ^= 0xFF
        elif action == "overwrite":
            content[offset : offset + len(noise)] = noise
        elif action == "truncate":
            del content[offset:]
        elif action == "empty":
            content = bytearray()
        if action == "delete":
            target.unlink()
        elif action == "swap":
            other = data.draw(st.sampled_from(files))
            target.write_bytes(other.read_bytes())
            other.write_bytes(bytes(content))
        else:
            target.write_bytes(bytes(content))
        exercise(store)
    finally:
        shutil.rmtree(store.parent)


@settings(max_examples=25, deadline=None)
@given(start=st.floats(0, 1), noise=st.binary(min_size=1, max_size=16))
def test_any_byte_region_of_a_packed_zip(pristine, start, noise):
    folder = Path(tempfile.mkdtemp(prefix="kdcache-fuzz-"))
    try:
        packed = folder / "s.zip"
        pack_store(pristine, packed)
        content = bytearray(packed.read_bytes())
        offset = int(start * (len(content) - 1))
        content[offset : offset + len(noise)] = noise
        packed.write_bytes(bytes(content))
        exercise(packed)
    finally:
        shutil.rmtree(folder)


#: A views store's parameter table (the rrc+flip+mixup recipe's 11 fields for 6 samples x 2
#: views) and a sequence store's token ids: the arrays written once, beside the rows.
VIEW_PARAMS = np.arange(6 * 2 * 11, dtype=np.float32).reshape(6, 2, 11) % 7
SEQUENCES = [np.array([1, 4, 2, 9]), np.array([3, 3, 0, 5, 6, 8, 2]), np.array([6, 1])]
SEQUENCE_ROWS = sum(len(tokens) - 1 for tokens in SEQUENCES)
SEQUENCE_LOGITS = np.arange(SEQUENCE_ROWS * 10, dtype=np.float32).reshape(SEQUENCE_ROWS, 10) / 3


@pytest.fixture(scope="module")
def pristine_views(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fuzz-views") / "s.zarr"
    writer = create_store(
        path,
        num_samples=6,
        num_classes=3,
        encoding="float32",
        chunk_rows=4,
        views=2,
        view_params=VIEW_PARAMS,
        augment={
            "recipe": "rrc+flip+mixup:0.2",
            "seed": 0,
            "sampler": "counter-v1",
            "fields": [f"f{i}" for i in range(11)],
            "input_size": [8, 8],
        },
    )
    writer.write(np.arange(12), LOGITS)
    writer.finalize()
    return path


@pytest.fixture(scope="module")
def pristine_sequences(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fuzz-sequences") / "s.zarr"
    writer = create_sequence_store(
        path, sequences=SEQUENCES, vocab_size=10, encoding="float32", chunk_rows=4
    )
    writer.write(range(len(SEQUENCES)), SEQUENCE_LOGITS)
    writer.finalize()
    return path


def _read_views(path: Path) -> None:
    reader = open_store(path)
    if reader.view_params is None:  # the array is gone: its users refuse a recipe without it
        assert not (path / "view_params" / "zarr.json").exists()
        return
    np.testing.assert_array_equal(reader.view_params, VIEW_PARAMS)
    logits, params = reader.read_views(np.arange(6), temperature=1.0)
    np.testing.assert_array_equal(logits.reshape(12, 3).numpy(), LOGITS)
    np.testing.assert_array_equal(params, VIEW_PARAMS)


def _read_sequences(path: Path) -> None:
    store = open_sequence_store(path)
    np.testing.assert_array_equal(store.offsets, sequence_offsets([len(t) for t in SEQUENCES]))
    for sample, tokens in enumerate(SEQUENCES):
        np.testing.assert_array_equal(store.tokens(sample), tokens)
    np.testing.assert_array_equal(dense(store.read(range(3))).numpy(), SEQUENCE_LOGITS)


def exercise_arrays(path: Path, read) -> None:
    """``verify`` and a full ``read`` either give exactly what was written or one line of
    KdcacheError; a damaged array is never read as other values, and nothing is written."""
    before = snapshot(path)
    for action in (lambda: verify_store(path).lines(), lambda: read(path)):
        try:
            action()
        except KdcacheError as error:
            assert "\n" not in str(error), str(error)  # noqa: PT017 - not every case fails
    assert snapshot(path) == before


def _damage(data, path: Path, action: str, start: float, length: int) -> None:
    content = bytearray(path.read_bytes())
    offset = int(start * max(len(content) - 1, 0))
    if action == "flip" and content:
        for i in range(offset, min(offset + length, len(content))):
            content[i] ^= data.draw(st.integers(1, 255), label="mask")
    elif action == "truncate":
        del content[offset:]
    if action == "delete":
        path.unlink()
    else:
        path.write_bytes(bytes(content))


ARRAY_DAMAGE = dict(
    data=st.data(),
    action=st.sampled_from(["flip", "flip", "truncate", "delete"]),
    start=st.floats(0, 1),
    length=st.integers(1, 8),
)


@FUZZ
@given(**ARRAY_DAMAGE)
def test_any_byte_of_view_params_damaged(pristine_views, data, action, start, length):
    store = damaged_copy(pristine_views)
    try:
        files = sorted(p for p in (store / "view_params").rglob("*") if p.is_file())
        _damage(data, data.draw(st.sampled_from(files)), action, start, length)
        exercise_arrays(store, _read_views)
    finally:
        shutil.rmtree(store.parent)


@FUZZ
@given(array=st.sampled_from(["offsets", "first_token", "labels"]), **ARRAY_DAMAGE)
def test_any_byte_of_a_sequence_array_damaged(
    pristine_sequences, array, data, action, start, length
):
    store = damaged_copy(pristine_sequences)
    try:
        files = sorted(p for p in (store / array).rglob("*") if p.is_file())
        _damage(data, data.draw(st.sampled_from(files)), action, start, length)
        exercise_arrays(store, _read_sequences)
    finally:
        shutil.rmtree(store.parent)


@FUZZ
@given(data=st.data(), delete=st.booleans(), value=JSON_VALUES, sequence=st.booleans())
def test_any_view_or_sequence_record_field_set_to_anything(
    pristine_views, pristine_sequences, data, delete, value, sequence
):
    store = damaged_copy(pristine_sequences if sequence else pristine_views)
    try:
        document = json.loads((store / "zarr.json").read_text())
        record = document["attributes"]["kdcache"]
        fields = [
            path
            for path in _field_paths(record)
            if path[0] in ("augment", "views", "extra", "digests", "arrays", "num_samples")
        ]
        _set_path(record, data.draw(st.sampled_from(fields)), value, delete)
        (store / "zarr.json").write_text(json.dumps(document))
        exercise_arrays(store, _read_sequences if sequence else _read_views)
    finally:
        shutil.rmtree(store.parent)


def test_the_cli_prints_one_line_for_damaged_stores(pristine, tmp_path):
    store = Path(shutil.copytree(pristine, tmp_path / "s.zarr"))
    (store / "logits" / "zarr.json").write_text("{not json")
    assert_one_line_error(run_cli("verify", str(store), check=False), "logits")
    (store / "zarr.json").write_text("")
    result = run_cli(
        "distill",
        "--student",
        "mlp",
        "--cache",
        str(store),
        "--out",
        str(tmp_path / "r"),
        check=False,
    )
    assert_one_line_error(result, "zarr.json")
    assert not (tmp_path / "r").exists()
