"""The measurements behind ``kdcache bench`` (docs/benchmarks.md), one module per benchmark.

:mod:`~kdcache.bench.feed` (the logit feed, and the helpers every benchmark shares),
:mod:`~kdcache.bench.dump` (the dump against the bare teacher), :mod:`~kdcache.bench.writer`
(the store writer alone), :mod:`~kdcache.bench.inputs` (the input path to the device),
:mod:`~kdcache.bench.distill` (distillation from the cache) and :mod:`~kdcache.bench.lm` (a
language model's dump, token feed and distillation, side by side).
"""
