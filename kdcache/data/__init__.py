"""From samples to device batches: datasets named by a spec, their pixels, loaders and the input
path to the device.

:mod:`~kdcache.data.datasets` (specs, kinds, fingerprints), :mod:`~kdcache.data.pixels` (uint8
and JPEG inputs made float32 where they land), :mod:`~kdcache.data.loaders` (indexed loaders and
the per-rank epoch sampler) and :mod:`~kdcache.data.device_input` (batches staged onto the
device ahead of the step).
"""
