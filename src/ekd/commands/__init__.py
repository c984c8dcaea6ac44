"""The user-facing commands: the ``ekd`` command line (:mod:`.cli`, with :mod:`.cli_data` and
:mod:`.cli_deploy`) and what the commands do beyond wiring: evaluation reports
(:mod:`.eval_report`, ``ekd eval``), ``ekd compare`` (:mod:`.compare`), ``ekd demo``
(:mod:`.demo`, :mod:`.demo_report`, :mod:`.side_by_side`) and ``ekd diagnose``
(:mod:`.diagnostics_report`). ``ekd teacher-cache`` is wired in :mod:`.cli` and done by
:mod:`ekd.teachers.cache_builder`. Importing this package imports none of its modules.
"""
