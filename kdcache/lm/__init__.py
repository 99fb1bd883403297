"""Language models: token-level stores from a local causal LM over local text, and students.

Needs the optional extra ``pip install -e ".[llm]"`` (transformers, tokenizers), imported only
when a language-model command runs. Teachers and students are ``hf:PATH`` (a ``save_pretrained``
folder) or ``package.module:function``; datasets are ``text:FILE[:MAX_LENGTH]`` or a table's
column (``jsonl:``, ``parquet:``, ``hfdisk:``). See docs/lm.md.
"""
