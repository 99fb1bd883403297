"""Bridges to the soft-label files other tools write: import them into kdcache stores, and export a
token store to DistillKit's Parquet layout. One module per format:

- :mod:`~kdcache.store.bridges.distillkit`: DistillKit's Parquet logit sets (arcee-ai/DistillKit);
- :mod:`~kdcache.store.bridges.megatron`: Megatron-LM's offline-logit tar shards;
- :mod:`~kdcache.store.bridges.tinyvit`: TinyViT's ``keys.txt``/``values.bin`` top-k files;
- :mod:`~kdcache.store.bridges.fkd`: FKD's per-image soft-label files.

Every format keeps the teacher's top-k probabilities only; :mod:`~kdcache.store.bridges.topk`
turns them into rows a kdcache store holds, the missing mass spread evenly over the other
classes (docs/merging.md says what each format keeps and loses).
"""

__all__: list[str] = []
