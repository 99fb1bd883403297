"""Causal language models named by a spec: ``hf:PATH`` or ``package.module:function``.

``hf:PATH`` is a folder in the ``save_pretrained`` layout holding ``config.json`` and the tokenizer
files. With weights there (``*.safetensors`` or ``pytorch_model*.bin``) they are loaded; without,
the model is built from the config with random weights drawn under the run's seed, which is how a
student starts from scratch. Nothing is ever downloaded.

``package.module:function`` is called with no arguments (after seeding) and returns
``(model, tokenizer)``: a module taking ``input_ids`` and ``attention_mask`` that returns logits
(B, L, V) or an object with ``.logits``, and a Hugging Face tokenizer.
"""

from __future__ import annotations

import hashlib
import importlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcache.errors import CheckpointError, SpecError
from kdcache.lm._hf import require_transformers
from kdcache.temporaries import create_folder, own_folder_exists

LM_SPEC_FORMS = "hf:PATH (a save_pretrained folder) or package.module:function"


@dataclass
class CausalLM:
    """A loaded model with its tokenizer; ``vocab_size`` is the width of its logits."""

    spec: str
    model: nn.Module
    tokenizer: Any
    vocab_size: int
    weights_sha256: str | None

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Float32 logits (B, L, V) taken from the model's output, whatever its dtype."""
        return lm_logits(self.model, input_ids, attention_mask)


def lm_logits(
    module: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Float32 logits (B, L, V) of a causal LM ``module`` (or its compiled or DDP wrapper)."""
    output = module(input_ids=input_ids, attention_mask=attention_mask)
    logits = output if isinstance(output, torch.Tensor) else output.logits
    return logits.float()


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


def load_causal_lm(spec: str, *, seed: int = 0, device: torch.device | None = None) -> CausalLM:
    """Load the model and tokenizer named by ``spec`` (see the module docstring), in float32."""
    kind, sep, arg = spec.partition(":")
    torch.manual_seed(seed)
    if kind == "hf" and sep:
        model, tokenizer, digest = _load_hf(Path(arg), spec)
    elif sep and kind and arg and "/" not in kind:
        model, tokenizer = _load_function(kind, arg, spec)
        digest = None
    else:
        raise SpecError(f"unknown language-model spec {spec!r}; use {LM_SPEC_FORMS}")
    model = model.float()
    if device is not None:
        model = model.to(device)
    probe = torch.zeros(1, 2, dtype=torch.long, device=device)
    with torch.no_grad():
        was_training = model.training
        model.eval()
        output = model(input_ids=probe, attention_mask=torch.ones_like(probe))
        model.train(was_training)
    logits = output if isinstance(output, torch.Tensor) else output.logits
    return CausalLM(spec, model, tokenizer, int(logits.shape[-1]), digest)


def _load_hf(path: Path, spec: str) -> tuple[nn.Module, Any, str | None]:
    if not (path / "config.json").is_file():
        raise SpecError(
            f"{spec}: {path} is not a save_pretrained folder (no config.json there); pass a folder "
            "written by model.save_pretrained() and tokenizer.save_pretrained()"
        )
    transformers = require_transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise SpecError(
            f"{spec}: no tokenizer could be loaded from {path} ({error}); save it there with "
            "tokenizer.save_pretrained()"
        ) from None
    files = _weight_files(path)
    try:
        if files:
            # In the checkpoint's own dtype; load_causal_lm casts to float32 (exact from bf16/fp16).
            model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        else:
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
            model = transformers.AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as error:
        raise CheckpointError(
            f"{spec}: cannot build a causal LM from {path} ({error}); check config.json and weights"
        ) from None
    return model, tokenizer, weights_digest(files)


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


def save_causal_lm(lm: CausalLM, folder: Path) -> None:
    """Write the model and tokenizer to ``folder`` as ``hf:folder`` loads them, replacing it whole.

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
    shutil.rmtree(folder, ignore_errors=True)
    temporary.rename(folder)
