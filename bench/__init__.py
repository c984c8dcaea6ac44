"""The benchmarks: the scripts that measure ekd and write the committed results in
``bench/results/`` and ``docs/results/``. Each is run from the repository root as a module,
``python -m bench.<name>`` (for example ``python -m bench.kd_table --profile cpu2 --report-only``);
they use ekd's public API only, and ekd never imports them.

Layers, bottom to top (a module imports its own layer or lower ones, never in a circle;
``tests/test_architecture.py`` checks it):

1. **What a cell is and how it is judged** — ``kd_profiles`` (profiles, cells, plans, method
   settings), ``kd_choices`` (the rules that pick settings on the validation split),
   ``kd_protocols`` (the real-face evaluation protocols), ``kd_significance`` (bootstrap
   intervals and paired differences), ``kd_convergence_criterion`` (when a schedule has
   converged, and its evidence table).
2. **Running cells** — ``kd_cells``: the committed cell store, one cell's training and
   evaluation, many cells as subprocesses (``python -m bench.<command> --run-cell``).
3. **Reports** — ``kd_summary`` (the README's results block) and ``kd_report`` (a KD table's
   Markdown, CSV, JSON and plots), built from the committed cells alone.
4. **Commands** — everything else: the KD table (``kd_table``: its cells' configs and hashes, and
   the command), the convergence sweep (``kd_convergence``), the EKD ablation and the cpu3
   tuning (``ekd_ablation``, ``kd_tuning``), the GPU session (``gpu_check``, ``gpu_bundle``,
   ``gpu_session.sh``), and the stand-alone measurements (``step_time``, ``compile_speed``,
   ``read_speed``, ``eval_speed``, ``distill_cost``, ``int8_parity``, ...).
"""
