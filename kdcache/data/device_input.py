"""The input path to the device: small batches across the bus, float images made where they land.

A dataset hands out uint8 images (or, for ``imagefolder`` on CUDA, the JPEG files themselves);
the DataLoader collates them in pinned memory; :class:`InputPipeline` copies each batch to the
device without blocking, from a background thread on a side CUDA stream, ahead of the step that
uses it, together with whatever rides along (a cached store's teacher logits). The step's first
operation turns the pixels into the float32 (optionally channels-last) images the model expects,
for the student and the teacher alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from kdcache.augment.views import ViewDataset
from kdcache.choices import INPUT_CHOICES
from kdcache.data.datasets import LabeledDataset
from kdcache.data.loaders import make_loader
from kdcache.data.pixels import collate_files, decode_files, split_files
from kdcache.errors import ConfigError
from kdcache.logits.sparse import SparseLogits, TeacherInput

#: Looks up what rides along with a batch (on the host) from its sample indices.
Attach = Callable[[torch.Tensor], TeacherInput]
#: Batches staged on the device ahead of the step that uses them.
PREFETCH_BATCHES = 2
_END = object()


def resolve_inputs(
    requested: str, dataset: LabeledDataset, device: torch.device, *, views: bool = False
) -> str:
    """The input form a run uses: ``requested``, or for ``auto`` the fastest the dataset offers.

    ``auto`` picks ``jpeg`` (decoding on the GPU) for an image folder on CUDA, else ``uint8``
    where the dataset has it, else ``float32``. A run that draws augmented ``views`` always
    uses ``float32``: views are cut from float32 images.
    """
    if requested not in INPUT_CHOICES:
        raise ConfigError(
            f"unknown input form {requested!r}; valid choices: {', '.join(INPUT_CHOICES)}"
        )
    if views:
        if requested not in ("auto", "float32"):
            raise ConfigError(
                f"--inputs {requested} cannot be combined with augmentation: views are cut from "
                "float32 images; drop --inputs (or pass --inputs float32)"
            )
        requested = "float32"
    if requested != "auto":
        dataset.with_inputs(requested)  # raises, naming the forms this dataset has
        return requested
    if "jpeg" in dataset.input_forms and device.type == "cuda":
        return "jpeg"
    return "uint8" if "uint8" in dataset.input_forms else "float32"


@dataclass(frozen=True)
class DeviceBatch:
    """One batch ready for a step: float ``inputs`` and ``labels`` on the device.

    ``indices`` (the sample indices) stay on the host, where stores are read and written;
    ``teacher`` is what :class:`InputPipeline`'s ``attach`` looked up, on the device.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    teacher: TeacherInput | None = None


@dataclass
class _Staged:
    pixels: Any
    labels: torch.Tensor
    indices: torch.Tensor
    teacher: TeacherInput | None
    ready: torch.cuda.Event | None = None


class InputPipeline:
    """Loads ``dataset`` (in the form it was given, see :meth:`LabeledDataset.with_inputs`) onto
    ``device`` as float32 batches; ``channels_last`` lays 4-D images out for channels-last models.
    """

    def __init__(
        self,
        dataset: LabeledDataset | ViewDataset,
        *,
        device: torch.device,
        channels_last: bool = False,
    ) -> None:
        self.dataset = dataset
        self.form = dataset.input_form
        self.device = device
        self.channels_last = channels_last

    def loader(
        self,
        *,
        batch_size: int,
        num_workers: int,
        shuffle: bool,
        seed: int = 0,
        sampler: Sampler[int] | None = None,
    ) -> DataLoader:
        """:func:`kdcache.data.loaders.make_loader` over this pipeline's dataset."""
        return make_loader(
            self.dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            device=self.device,
            shuffle=shuffle,
            seed=seed,
            sampler=sampler,
            collate_fn=collate_files if self.form == "jpeg" else None,
        )

    def batches(
        self,
        loader: Iterable[tuple[Any, torch.Tensor, torch.Tensor]],
        *,
        attach: Attach | None = None,
    ) -> Iterator[DeviceBatch]:
        """The loader's ``(inputs, labels, indices)`` batches as :class:`DeviceBatch` es.

        A background thread takes batches from the loader, looks up what ``attach`` adds, and
        (on CUDA) starts their copies and a JPEG batch's decoding on a side stream, up to
        :data:`PREFETCH_BATCHES` ahead: the step only waits when the loader is slower than it.
        An error in the thread is raised here, unchanged.
        """
        staged: queue.Queue[Any] = queue.Queue(maxsize=PREFETCH_BATCHES)
        stop = threading.Event()

        def offer(item: Any) -> bool:
            while not stop.is_set():
                try:
                    staged.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False  # the consumer left early

        def produce() -> None:
            try:
                with contextlib.ExitStack() as context:
                    stream = None
                    if self.device.type == "cuda":
                        stream = torch.cuda.Stream(self.device)
                        context.enter_context(torch.cuda.device(self.device))
                        context.enter_context(torch.cuda.stream(stream))
                    for inputs, labels, indices in loader:
                        batch = self._stage(inputs, labels, indices, attach)
                        if stream is not None:
                            batch.ready = torch.cuda.Event()
                            batch.ready.record(stream)
                        if not offer(batch):
                            return
            except BaseException as error:  # raised again by the consumer
                offer(error)
                return
            offer(_END)

        thread = threading.Thread(target=produce, name="kdcache-prefetch", daemon=True)
        thread.start()
        try:
            while (item := staged.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield self.finish(item)
        finally:
            stop.set()
            thread.join()

    def _stage(
        self, inputs: Any, labels: torch.Tensor, indices: torch.Tensor, attach: Attach | None
    ) -> _Staged:
        """Start the batch's copies to the device (and a JPEG batch's decoding there)."""
        teacher = None if attach is None else _to_device(attach(indices), self.device)
        if self.form == "jpeg":
            assert self.dataset.jpeg_geometry is not None
            files = split_files(inputs)
            pixels = decode_files(files, self.dataset.jpeg_geometry, device=self.device)
        else:
            pixels = _to_device(inputs, self.device)
        return _Staged(pixels, _to_device(labels, self.device), indices, teacher)

    def finish(self, staged: _Staged) -> DeviceBatch:
        """The step's first operation: float32 (channels-last) images from the staged pixels."""
        if staged.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(staged.ready)
            # Made on the side stream, used on this one: keep the allocator from reusing them early.
            for tensor in _tensors(staged.pixels, staged.labels, staged.teacher):
                tensor.record_stream(current)
        pixels = staged.pixels
        if self.channels_last and pixels.dim() == 4:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        if self.form != "float32":
            assert self.dataset.normalization is not None
            pixels = self.dataset.normalization(pixels)
        return DeviceBatch(pixels, staged.labels, staged.indices, staged.teacher)


def _to_device(value: Any, device: torch.device) -> Any:
    """``value`` (a tensor or SparseLogits) on ``device``; from pinned memory without blocking."""
    if isinstance(value, SparseLogits):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return dataclasses.replace(
            value,
            **{
                name: _to_device(tensor, device)
                for name, tensor in fields.items()
                if isinstance(tensor, torch.Tensor)
            },
        )
    if device.type == "cuda" and value.device.type == "cpu" and not value.is_pinned():
        value = value.pin_memory()
    return value.to(device, non_blocking=True)


def _tensors(*values: Any) -> Iterator[torch.Tensor]:
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, SparseLogits):
            yield from (value.values, value.indices, value.tail)
