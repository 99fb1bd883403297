"""The input path: uint8 batches give the float path's inputs, logits and training results exactly
on the CPU; JPEG batches match within decoding rounding; the speed options are recorded."""

from __future__ import annotations

import json
from collections.abc import Generator

import numpy as np
import pytest
import torch
from narrowing import dense, present
from test_pixels import GREY_LEVEL, write_images
from torch.utils.data import Dataset

from kdcache.bench.inputs import bench_inputs, bytes_per_sample
from kdcache.config import DistillConfig, DumpConfig, TrainConfig
from kdcache.data.datasets import LabeledDataset, build_dataset
from kdcache.data.device_input import InputPipeline, resolve_inputs
from kdcache.dump.teacher import dump_teacher
from kdcache.errors import ConfigError, DatasetNotFoundError
from kdcache.store.read.reader import open_store
from kdcache.train.loop import distill, train

CPU = torch.device("cpu")


def all_inputs(pipeline: InputPipeline, num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    loader = pipeline.loader(batch_size=5, num_workers=num_workers, shuffle=False)
    batches = list(pipeline.batches(loader))
    return torch.cat([b.inputs for b in batches]), torch.cat([b.indices for b in batches])


def test_auto_picks_uint8_on_the_cpu_and_explicit_forms_are_checked(tmp_path):
    digits = build_dataset("digits")
    assert resolve_inputs("auto", digits, CPU) == "uint8"
    assert resolve_inputs("float32", digits, CPU) == "float32"
    with pytest.raises(ConfigError, match=r"cannot yield 'jpeg' inputs; it yields float32, uint8"):
        resolve_inputs("jpeg", digits, CPU)
    with pytest.raises(ConfigError, match=r"unknown input form 'png'; valid choices: auto,"):
        resolve_inputs("png", digits, CPU)
    write_images(tmp_path, [(12, 12)])
    folder = build_dataset(f"imagefolder:{tmp_path}:8")
    assert resolve_inputs("auto", folder, CPU) == "uint8"  # jpeg is auto only on CUDA
    assert resolve_inputs("jpeg", folder, CPU) == "jpeg"
    # Augmented views are cut from float32 images, whatever auto would pick.
    assert resolve_inputs("auto", digits, CPU, views=True) == "float32"
    with pytest.raises(ConfigError, match=r"--inputs uint8 cannot be combined with augmentation"):
        resolve_inputs("uint8", digits, CPU, views=True)
    with pytest.raises(ConfigError, match="unknown input form 'jpg'"):
        TrainConfig(model="mlp", out=str(tmp_path / "r"), inputs="jpg")
    with pytest.raises(ConfigError, match=r"unknown amp dtype 'fp8'; valid choices: bf16, fp16"):
        DumpConfig(teacher="mlp", amp="fp8")


def test_uint8_batches_equal_float_batches_in_order_and_channels_last():
    data = build_dataset("fake:23:10:3")
    floats, float_order = all_inputs(InputPipeline(data, device=CPU))
    pixels = InputPipeline(data.with_inputs("uint8"), device=CPU, channels_last=True)
    loader = pixels.loader(batch_size=5, num_workers=0, shuffle=False)
    batches = list(pixels.batches(loader))
    assert [len(b.indices) for b in batches] == [5, 5, 5, 5, 3]
    assert all(b.inputs.is_contiguous(memory_format=torch.channels_last) for b in batches)
    assert torch.equal(torch.cat([b.inputs for b in batches]), floats)
    assert torch.equal(torch.cat([b.indices for b in batches]), float_order)
    assert torch.equal(torch.cat([b.labels for b in batches]), torch.from_numpy(data.labels))
    assert isinstance(pixels.dataset, LabeledDataset)
    assert bytes_per_sample(pixels.dataset) * 4 == bytes_per_sample(data) == 3 * 10 * 10 * 4


def test_attached_values_ride_along_with_their_batch():
    data = build_dataset("digits").with_inputs("uint8")
    pipeline = InputPipeline(data, device=CPU)
    loader = pipeline.loader(batch_size=64, num_workers=0, shuffle=True, seed=1)
    for batch in pipeline.batches(loader, attach=lambda indices: indices.double() * 10):
        assert torch.equal(dense(batch.teacher), batch.indices.double() * 10)
        assert torch.equal(batch.labels, torch.from_numpy(data.labels[batch.indices.numpy()]))


class _Broken(Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int):
        if index == 7:
            raise DatasetNotFoundError("sample 7 vanished; put it back")
        return torch.zeros(1, 2, 2), 0


def test_a_loader_error_reaches_the_consumer_and_leaving_early_stops_the_thread():
    broken = LabeledDataset(
        _Broken(),
        spec="broken",
        split="train",
        num_classes=2,
        in_channels=1,
        transform_description="",
        labels=np.zeros(10, dtype=np.int64),
    )
    pipeline = InputPipeline(broken, device=CPU)
    loader = pipeline.loader(batch_size=2, num_workers=0, shuffle=False)
    with pytest.raises(DatasetNotFoundError, match="sample 7 vanished"):
        list(pipeline.batches(loader))
    batches = pipeline.batches(loader)
    assert isinstance(batches, Generator)
    next(batches)
    batches.close()  # joins the prefetch thread; a hang here would time the test out


def test_uint8_dump_and_training_equal_the_float_path_exactly(tmp_path):
    stores = {}
    for form in ("float32", "uint8"):
        torch.manual_seed(0)  # same random teacher for both
        config = DumpConfig(teacher="cnn:4", out=str(tmp_path / f"{form}.zarr"), inputs=form)
        dump_teacher(config)
        stores[form] = dense(open_store(config.out).read(np.arange(1437)))
    assert torch.equal(stores["uint8"], stores["float32"])
    metrics = {}
    for form in ("float32", "uint8"):
        out = tmp_path / f"kd-{form}"
        distill(
            DistillConfig(
                student="mlp:8", cache=str(tmp_path / "uint8.zarr"), out=str(out), epochs=2
            )
            if form == "uint8"
            else DistillConfig(
                student="mlp:8",
                cache=str(tmp_path / "uint8.zarr"),
                out=str(out),
                epochs=2,
                inputs="float32",
            )
        )
        metrics[form] = [
            {k: v for k, v in json.loads(line).items() if k != "train_time_s"}
            for line in (out / "metrics.jsonl").read_text().splitlines()
        ]
        assert json.loads((out / "config.json").read_text())["resolved"]["inputs"] == form
    assert metrics["uint8"] == metrics["float32"]


def test_amp_and_channels_last_train_distill_and_dump_record_their_settings(tmp_path):
    torch.manual_seed(0)
    dump_teacher(DumpConfig(teacher="cnn:4", out=str(tmp_path / "t32.zarr")))
    torch.manual_seed(0)
    amp = DumpConfig(teacher="cnn:4", out=str(tmp_path / "bf16.zarr"), amp="bf16")
    dump_teacher(amp)
    reader = open_store(amp.out)
    assert present(reader.metadata.teacher)["amp"] == "bf16"
    assert "amp" not in present(open_store(str(tmp_path / "t32.zarr")).metadata.teacher)
    exact, bf16 = (
        dense(open_store(str(tmp_path / name)).read(np.arange(300)))
        for name in ("t32.zarr", "bf16.zarr")
    )
    assert not torch.equal(exact, bf16)  # really computed in bf16 ...
    torch.testing.assert_close(bf16, exact, rtol=0.05, atol=0.05)  # ... to bf16's precision
    losses = {}
    for precision in ("bf16", None):
        run = tmp_path / f"kd-{precision}"
        distill(
            DistillConfig(
                student="mlp:16",
                cache=amp.out,
                out=str(run),
                epochs=2,
                amp=precision,
                channels_last=True,
            )
        )
        lines = (run / "metrics.jsonl").read_text().splitlines()
        losses[precision] = [json.loads(line)["train_loss"] for line in lines]
    config = json.loads((tmp_path / "kd-bf16" / "config.json").read_text())
    assert (config["amp"], config["channels_last"], config["compile"]) == ("bf16", True, False)
    assert config["resolved"]["store"]["teacher"]["amp"] == "bf16"
    assert losses["bf16"] != losses[None]  # the student really ran in bf16 ...
    np.testing.assert_allclose(losses["bf16"], losses[None], rtol=0.02)  # ... to its precision
    online = distill(
        DistillConfig(
            student="mlp:8",
            teacher="cnn:4",
            dataset="digits",
            out=str(tmp_path / "online"),
            epochs=1,
            amp="fp16",
        )
    )
    assert np.isfinite(online.best)


def test_jpeg_dump_matches_the_pil_dump_and_is_recorded(tmp_path):
    write_images(tmp_path / "images", [(40, 30), (30, 40), (25, 25), (64, 48)])
    spec = f"imagefolder:{tmp_path / 'images'}:16"
    logits = {}
    for form in ("uint8", "jpeg"):
        torch.manual_seed(0)
        config = DumpConfig(
            teacher="cnn:4", dataset=spec, out=str(tmp_path / f"{form}.zarr"), inputs=form
        )
        dump_teacher(config)
        reader = open_store(config.out)
        logits[form] = dense(reader.read(np.arange(reader.num_samples)))
        assert present(reader.metadata.dataset).get("inputs") == (
            "jpeg" if form == "jpeg" else None
        )
    scale = logits["uint8"].abs().max()
    assert (logits["jpeg"] - logits["uint8"]).abs().max() < 0.05 * scale
    # The inputs themselves, through the same pipeline as the run: within decoding rounding.
    data = build_dataset(spec)
    # A worker process hands whole batches of files over, as one buffer plus lengths.
    jpeg, order = all_inputs(InputPipeline(data.with_inputs("jpeg"), device=CPU), num_workers=1)
    floats, float_order = all_inputs(InputPipeline(data, device=CPU))
    assert torch.equal(order, float_order)
    assert ((jpeg - floats).abs() / GREY_LEVEL).mean() < 0.5


def test_compiled_training_saves_plain_weights(tmp_path):
    out = tmp_path / "compiled"
    # 1437 = 3 x 479: equal batches, so one compiled graph (no recompile for a short last batch).
    train(TrainConfig(model="mlp:8", out=str(out), epochs=1, batch_size=479, compile=True))
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["state_dict"]
    assert state
    assert not any(key.startswith("_orig_mod") for key in state)
    assert json.loads((out / "config.json").read_text())["compile"] is True


def test_bench_inputs_reports_each_form_and_the_bytes_it_moves():
    result = bench_inputs(dataset="fake:40:16:3", batch_size=8, repeats=2, device="cpu", threads=1)
    json.dumps(result)
    forms = result["forms"]
    assert set(forms) == {"float32", "uint8"}
    assert forms["float32"]["bytes_per_batch"] == 8 * 3 * 16 * 16 * 4
    assert forms["uint8"]["bytes_per_batch"] == 8 * 3 * 16 * 16
    assert len(forms["uint8"]["all_pass_s"]) == 2
    assert forms["uint8"]["speed_over_float32"] > 0
    with pytest.raises(ConfigError, match="cannot yield 'jpeg'"):
        bench_inputs(dataset="fake:40:16:3", forms=("jpeg",), device="cpu", repeats=1)
