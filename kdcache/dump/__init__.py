"""Stage one: run the teacher once and store its logits (:mod:`~kdcache.dump.teacher`), in one
process or split between the ranks of a torchrun job (:mod:`~kdcache.dump.ranks`)."""
