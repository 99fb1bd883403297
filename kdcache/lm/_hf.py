"""The optional Hugging Face dependencies, imported on first use with a one-line error if absent."""

from __future__ import annotations

from types import ModuleType

from kdcache.errors import ConfigError


def require_transformers() -> ModuleType:
    """The ``transformers`` module, quiet (no download attempts, no progress bars)."""
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            "language-model specs (hf:PATH, text:FILE) need transformers and tokenizers, which are "
            'not installed; install them with pip install -e ".[llm]"'
        ) from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers
