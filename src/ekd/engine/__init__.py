"""The training loop and nothing else: :mod:`.trainer` (the loop, ``train``), its builders
(:mod:`.build`, :mod:`.distill_inputs`), the optimiser and schedule (:mod:`.optim`), the training
checkpoint (:mod:`.state`), the checks against the registries before any heavy work
(:mod:`.preflight`), ``weight: auto`` (:mod:`.auto_weight`), the in-training gradient-share measurement (:mod:`.diagnostics`), the
divergence guard (:mod:`.guard`), validation during training (:mod:`.validation`), TensorBoard
(:mod:`.tensorboard_log`) and the run folder (:mod:`.run_folder`).

Teachers are in :mod:`ekd.teachers`, the user-facing commands in :mod:`ekd.commands`, the
``torchrun`` process-group helpers in :mod:`ekd.utils.distributed`. Importing
this package imports none of its modules.
"""
