"""Stores used from other training code: the Hugging Face Trainer (:mod:`.hf_trainer`).

Each module imports its framework on first use, so that kdcache itself never needs it. See
docs/integrations.md.
"""
