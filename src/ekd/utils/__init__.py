"""Small shared helpers at the bottom of ekd, importing nothing of ekd but :mod:`ekd.errors`:
checkpoint files (atomic writes, safe loads, strict state restoration: :mod:`.checkpoint_io`),
the run's device and seeds (:mod:`.device`) and the ``torchrun`` process-group helpers
(:mod:`.distributed`: used by the training loop and by the teacher-cache builder, which shards
its images over ranks too). Every layer may use them; they use no layer.
"""
