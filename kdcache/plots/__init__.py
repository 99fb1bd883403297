"""Figures: runs, sweeps and stores (:mod:`~kdcache.plots.figures`) and a store's views
(:mod:`~kdcache.plots.views`). matplotlib is imported only when a figure is drawn."""
