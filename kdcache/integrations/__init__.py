"""Stores used from other training code: the Hugging Face Trainer (:mod:`.hf_trainer`), timm's
``train.py`` loop (:mod:`.timm_loop`), and any loop that reads the teacher's rows by index
(:mod:`.indexed`, as the Lightning example of docs/integrations.md does).

Each module imports its framework when it is imported or first used, so that kdcache itself never
needs it. See docs/integrations.md.
"""
