"""Small shared helpers at the bottom of ekd, importing nothing of ekd but :mod:`ekd.errors`:
checkpoint files (atomic writes, safe loads, strict state restoration: :mod:`.checkpoint_io`)
and the run's device and seeds (:mod:`.device`). Every layer may use them; they use no layer.
"""
