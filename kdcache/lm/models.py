"""Causal language models named by a spec: ``hf:PATH`` or ``package.module:function``.

``hf:PATH`` is a folder in the ``save_pretrained`` layout holding ``config.json`` and the tokenizer
files. With weights there (``*.safetensors`` or ``pytorch_model*.bin``) they are loaded; without,
the model is built from the config with random weights drawn under the run's seed, which is how a
student starts from scratch. Nothing is ever downloaded.

``package.module:function`` is called with no arguments (after seeding) and returns
``(model, tokenizer)``: a module taking ``input_ids`` and ``attention_mask`` that returns logits
(B, L, V) or an object with ``.logits``, and a Hugging Face tokenizer.

Weights stay in the dtype they come in (a bf16 checkpoint runs in bf16: no float32 copy of a
large teacher); only the logits are upcast to float32. A head wider than the tokenizer's
vocabulary (rows padded for speed, as Qwen2.5's 152,064 for 151,665 tokens) has its padded
columns dropped: ``CausalLM.vocab_size`` is the tokenizer's vocabulary then.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcache.errors import CheckpointError, SpecError
from kdcache.lm._hf import require_transformers
from kdcache.lm.text import TokenDataset
from kdcache.store.format.layout import first_line
from kdcache.temporaries import create_folder, own_folder_exists

LM_SPEC_FORMS = "hf:PATH (a save_pretrained folder) or package.module:function"


@dataclass
class CausalLM:
    """A loaded model with its tokenizer.

    ``vocab_size`` is the width of the logits :meth:`logits` gives: the model's output width
    (``head_size``), or the tokenizer's vocabulary when the head is padded beyond it.
    ``dtype`` is the weights' own (``"bfloat16"``, ``"float32"``, ...).
    """

    spec: str
    model: nn.Module
    tokenizer: Any
    vocab_size: int
    weights_sha256: str | None
    head_size: int = 0
    dtype: str = "float32"

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Float32 logits (B, L, vocab_size) from the model's output, whatever its dtype."""
        return lm_logits(self.model, input_ids, attention_mask, width=self.vocab_size)

    def rows(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Float32 rows (n, vocab_size) of the positions in ``mask`` (B, L), row-major: the
        positions are picked in the model's dtype before the upcast, so a bf16 teacher's padding
        and last positions never get a float32 copy (B x L x V x 4 bytes)."""
        return lm_logits(self.model, input_ids, attention_mask, width=self.vocab_size, mask=mask)


def lm_logits(
    module: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    width: int | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float32 logits (B, L, V) of a causal LM ``module`` (or its compiled or DDP wrapper),
    cut to the first ``width`` columns when given (a padded head's extra rows dropped before
    the upcast, so no float32 copy of them is made); with ``mask`` (B, L), only the rows of its
    positions (n, V), picked before the upcast too."""
    output = module(input_ids=input_ids, attention_mask=attention_mask)
    logits = output if isinstance(output, torch.Tensor) else output.logits
    if width is not None and width < logits.shape[-1]:
        logits = logits[..., :width]
    if mask is not None:
        logits = logits[mask]
    return logits.float()


def true_vocab_size(head_size: int, tokenizer: Any) -> int:
    """The logits' width worth keeping: the tokenizer's vocabulary when the head is padded
    beyond it, else the head's width (a tokenizer larger than the head is refused elsewhere)."""
    try:
        tokens = len(tokenizer)
    except TypeError:
        return head_size
    return tokens if 0 < tokens < head_size else head_size


def weights_dtype(model: nn.Module) -> str:
    """The dtype of the model's first floating parameter, as torch names it without ``torch.``."""
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return str(parameter.dtype).removeprefix("torch.")
    return "float32"


def pad_id(lm: CausalLM) -> int:
    """Any id works (padding is masked); the tokenizer's own keeps saved batches readable."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(lm.tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def is_lm_model_spec(spec: str | None) -> bool:
    return spec is not None and spec.startswith("hf:")


def _weight_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors")) + sorted(path.glob("pytorch_model*.bin"))


def weights_digest(files: list[Path]) -> str | None:
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as stream:
            while block := stream.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def load_causal_lm(
    spec: str,
    *,
    seed: int = 0,
    device: torch.device | None = None,
    device_map: str | dict[str, Any] | None = None,
) -> CausalLM:
    """Load the model and tokenizer named by ``spec`` (see the module docstring), its weights in
    their own dtype.

    ``device_map`` (``"auto"``, ``"balanced"``, a dict of module names to devices, ...) is given
    to Transformers' ``from_pretrained``, which places the layers across the local devices (a
    teacher too large for one); the model is then left where it put it, and ``device`` only
    says where the inputs start. It needs an ``hf:PATH`` with weights.
    """
    kind, sep, arg = spec.partition(":")
    torch.manual_seed(seed)
    if kind == "hf" and sep:
        model, tokenizer, digest = _load_hf(Path(arg), spec, device_map=device_map)
    elif sep and kind and arg and "/" not in kind:
        if device_map is not None:
            raise SpecError(
                f"--device-map needs an hf:PATH teacher with weights, got {spec}; drop "
                "--device-map or save the model with save_pretrained()"
            )
        model, tokenizer = _load_function(kind, arg, spec)
        digest = None
    else:
        raise SpecError(f"unknown language-model spec {spec!r}; use {LM_SPEC_FORMS}")
    if device is not None and device_map is None:
        model = model.to(device)
    probe = torch.zeros(1, 2, dtype=torch.long, device=device)
    with torch.no_grad():
        was_training = model.training
        model.eval()
        output = model(input_ids=probe, attention_mask=torch.ones_like(probe))
        model.train(was_training)
    logits = output if isinstance(output, torch.Tensor) else output.logits
    head_size = int(logits.shape[-1])
    return CausalLM(
        spec,
        model,
        tokenizer,
        true_vocab_size(head_size, tokenizer),
        digest,
        head_size=head_size,
        dtype=weights_dtype(model),
    )


def _load_hf(
    path: Path, spec: str, *, device_map: str | dict[str, Any] | None = None
) -> tuple[nn.Module, Any, str | None]:
    if not (path / "config.json").is_file():
        raise SpecError(
            f"{spec}: {path} is not a save_pretrained folder (no config.json there); pass a folder "
            "written by model.save_pretrained() and tokenizer.save_pretrained()"
        )
    transformers = require_transformers()
    from safetensors import SafetensorError  # installed with transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise SpecError(
            f"{spec}: no tokenizer could be loaded from {path} ({first_line(error)}); save it "
            "there with tokenizer.save_pretrained()"
        ) from None
    files = _weight_files(path)
    if device_map is not None and not files:
        raise SpecError(
            f"--device-map places a checkpoint's weights, but {path} holds none (config.json "
            "only: a model with random weights); drop --device-map"
        )
    try:
        if files:
            # dtype="auto": the checkpoint's own dtype, so a bf16 teacher takes half the memory.
            # weights_only: a pytorch_model.bin is unpickled by torch's tensors-only unpickler, so
            # a pickle that names any other callable is refused before anything of it runs.
            # Mismatched shapes are loaded aside (ignore_mismatched_sizes) and refused below,
            # naming the tensor, rather than raised by transformers without saying which.
            model, loading = transformers.AutoModelForCausalLM.from_pretrained(
                path,
                local_files_only=True,
                weights_only=True,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
                dtype="auto",
                **({"device_map": device_map} if device_map is not None else {}),
            )
        else:
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
            # Random weights are drawn in float32 whatever config.json's dtype says: a model
            # trained from scratch keeps float32 masters (--amp gives the half-precision speed).
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            loading = {}
    except pickle.UnpicklingError as error:
        pickled = [file.name for file in files if file.suffix == ".bin"]
        raise CheckpointError(
            f"{spec}: {', '.join(pickled) or 'a weights file'} in {path} is a pickle that holds "
            f"more than tensors ({_unpickling_reason(error)}); kdcache never runs such a pickle: "
            "save the model as safetensors (model.save_pretrained(PATH)) from a trusted copy"
        ) from None
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:
        raise CheckpointError(
            f"{spec}: cannot build a causal LM from {path} ({first_line(error)}); check "
            "config.json and the weights files"
        ) from None
    _refuse_unfit_weights(loading, path, spec)
    return model, tokenizer, weights_digest(files)


def _refuse_unfit_weights(loading: dict[str, Any], path: Path, spec: str) -> None:
    """Refuse weights that left tensors of the model random: a wrong shape, or none at all."""
    mismatched = sorted(loading.get("mismatched_keys") or (), key=lambda item: str(item[0]))
    if mismatched:
        name, stored, expected = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise CheckpointError(
            f"{spec}: the weights in {path} do not fit its config.json: {name} is "
            f"{tuple(stored)} there but {tuple(expected)} in the model{more}; save the "
            "weights and config.json together with model.save_pretrained()"
        )
    missing = sorted(loading.get("missing_keys") or ())
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(
            f"{spec}: the weights in {path} lack {missing[0]}{more}, which would stay random; "
            "save the whole model with model.save_pretrained()"
        )


def _unpickling_reason(error: BaseException) -> str:
    """The line of torch's refusal that names what the pickle asked for."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "global" in line]
    return (named or lines or ["unreadable"])[0][:160].rstrip(".")


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's config says it takes (None when none says): the first
    config found in its modules, so that a wrapper (``module:function``, DDP) answers too."""
    for module in model.modules():
        config = getattr(module, "config", None)
        for name in ("max_position_embeddings", "n_positions", "n_ctx"):
            value = getattr(config, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def embedding_rows(model: nn.Module) -> int | None:
    """Token ids the model can embed (None when no module of it has an input embedding)."""
    for module in model.modules():
        get = getattr(module, "get_input_embeddings", None)
        rows = getattr(get() if callable(get) else None, "num_embeddings", None)
        if isinstance(rows, int):
            return rows
    return None


def check_dataset_fits(lm: CausalLM, dataset: TokenDataset) -> None:
    """Refuse a dataset whose sequences ``lm`` cannot take, before a batch is allocated: a
    MAX_LENGTH beyond its positions or a token id beyond its embedding."""
    positions = max_positions(lm.model)
    if positions is not None and dataset.max_length > positions:
        raise SpecError(
            f"{dataset.spec}: MAX_LENGTH {dataset.max_length} is more than the {positions} "
            f"positions of {lm.spec}; use text:FILE:{positions} or less"
        )
    rows = embedding_rows(lm.model)
    highest = max(int(tokens.max()) for tokens in dataset.sequences)
    if rows is not None and highest >= rows:
        raise SpecError(
            f"{lm.spec}'s tokenizer gives token id {highest} in {dataset.spec} but its input "
            f"embedding has {rows} rows; make config.json's vocab_size cover the tokenizer's "
            f"{len(lm.tokenizer)} tokens"
        )


def _load_function(module_name: str, function_name: str, spec: str) -> tuple[nn.Module, Any]:
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise SpecError(f"cannot load {spec!r} ({error}); use {LM_SPEC_FORMS}") from None
    result = function()
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)):
        raise SpecError(
            f"{spec} must return (model, tokenizer), got {type(result).__name__}; see docs/lm.md"
        )
    return result


#: What a run's ``best/`` or ``last/`` folder records of the moment it was saved.
CHECKPOINT_RECORD = "kdcache_checkpoint.json"


def save_causal_lm(lm: CausalLM, folder: Path, *, record: dict[str, Any] | None = None) -> None:
    """Write the model and tokenizer to ``folder`` as ``hf:folder`` loads them, replacing it whole;
    ``record`` (a run's epoch, step and score) beside them as :data:`CHECKPOINT_RECORD`.

    Written into ``folder.tmp`` first, so ``folder`` is never a half-written checkpoint.
    """
    temporary = folder.with_name(folder.name + ".tmp")
    purpose = f"the checkpoint {folder.name} being saved"
    if own_folder_exists(temporary, purpose=purpose):
        shutil.rmtree(temporary)  # a killed save's leftover; a link there is refused, not followed
    create_folder(temporary, purpose=purpose)
    save = getattr(lm.model, "save_pretrained", None)
    if not callable(save):
        raise CheckpointError(
            f"{lm.spec} has no save_pretrained(); language-model runs need a transformers model"
        )
    save(temporary)
    lm.tokenizer.save_pretrained(temporary)
    if record is not None:
        (temporary / CHECKPOINT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    temporary.rename(folder)
