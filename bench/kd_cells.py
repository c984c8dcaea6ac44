"""Cells of the KD table and the convergence sweep: run one, run many, keep the results.

A finished cell leaves two committed files in ``bench/results/kd_table/<profile>/`` (the report is
built from these alone, on any machine; a rerun skips a cell whose files are there):

- ``<slug>-<hash>.json``: the cell (teacher, method, seed, width), its config hash and config
  (paths replaced by ``<faces>``/``<cache>``), metrics, seconds, git commit, environment;
- ``<slug>-<hash>.boot.json``: its LFW all-pairs TPR at 1e-3/1e-4/1e-5 on 1,000 resamples of the
  *identities* (:mod:`ekd.eval.bootstrap`), in millionths. Every cell uses the same resamples
  (seed ``BOOT_SEED`` over the protocol's identities), so the report takes paired differences of
  two cells resample by resample without the models or their 20M scores.

The per-pair scores are not committed; the cache keeps each cell's bootstrap tail
(``tail.npz``: every genuine score and the top impostor scores with their identities) so other
resamplings can be drawn later.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "kd_table"
BOOT_SEED = 0
BOOT_RESAMPLES = 1000
BOOT_FPRS = (1e-3, 1e-4, 1e-5)
SCHEMA = 1


def git(*args: str) -> str:
    """Output of a git command in the repository ('unknown' without git)."""
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=REPO).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def recorded_channels_last(record: dict) -> bool:
    """Whether a committed cell trained its student in NHWC (``train.channels_last`` in its
    config; records without the key come from the trainer that used NCHW on CPU)."""
    return bool(record.get("config", {}).get("train", {}).get("channels_last", False))


def recorded_compile(record: dict) -> bool:
    """Whether a committed cell trained its student under ``torch.compile`` (``train.compile``
    in its config; records without the key ran eager)."""
    return bool(record.get("config", {}).get("train", {}).get("compile", False))


def cell_seconds(record: dict) -> float:
    """One cell's compute: training + evaluation + bootstrap seconds."""
    return record["train_seconds"] + record["eval_seconds"] + record.get("bootstrap_seconds", 0.0)


def adopted_clause(records: list[dict]) -> str:
    """The compute line's note on adopted cells (``adopted_from``: a committed record of the same
    config elsewhere, copied instead of trained), which the budget does not count twice."""
    adopted = [r for r in records if "adopted_from" in r]
    if not adopted:
        return ""
    return (f"; not counted: {len(adopted)} cells adopted from committed cells of the same config "
            f"({sum(cell_seconds(r) for r in adopted) / 3600:.2f} h when they were trained)")


def layout_summary(runs: list[dict]) -> str:
    """One report line: how many cells ran with the student in NHWC / NCHW, and compiled."""
    nhwc = sum(recorded_channels_last(r) for r in runs)
    compiled = sum(recorded_compile(r) for r in runs)
    return (f"- Student memory layout: {nhwc} cell(s) NHWC (`train.channels_last`), {len(runs) - nhwc} "
            f"NCHW; {compiled} compiled (`train.compile`), {len(runs) - compiled} eager. Neither is part "
            "of a cell's hash: they change the order of summation only, which training amplifies as any "
            "rounding change does (docs/benchmark.md, 'Reproducing a cell').")


class CellStore:
    """The committed per-cell files of one profile."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / f"{name}.json"

    def load(self, name: str) -> dict | None:
        file = self.path(name)
        return json.loads(file.read_text()) if file.is_file() else None

    def load_boot(self, name: str) -> dict | None:
        """``{"protocol", "fprs", "samples": [R, F] array}`` or None."""
        file = self.root / f"{name}.boot.json"
        if not file.is_file():
            return None
        data = json.loads(file.read_text())
        data["samples"] = np.asarray(data["tpr_millionths"], dtype=np.float64).T / 1e6
        return data

    def write(self, name: str, record: dict, boot: dict | None) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        if boot is not None:
            _atomic(self.root / f"{name}.boot.json", json.dumps(boot, separators=(",", ":")))
        _atomic(self.path(name), json.dumps(record, indent=1, default=float))
        return self.path(name)


def _atomic(file: Path, text: str) -> None:
    tmp = file.with_suffix(file.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, file)


def protocol_digest(tail) -> str:  # noqa: ANN001 - ekd.eval.bootstrap.PairTail
    """Identifies the pair set (identity sizes, impostor count): equal digests, equal resamples."""
    h = hashlib.sha256(np.asarray(tail.identity_sizes, dtype=np.int64).tobytes())
    h.update(str(tail.n_neg).encode())
    return h.hexdigest()[:12]


def bootstrap_record(tail) -> tuple[dict, float]:  # noqa: ANN001
    """The ``.boot.json`` content of one model's pair tail, and the seconds it took."""
    from ekd.eval.bootstrap import bootstrap_tpr

    t0 = time.perf_counter()
    samples = bootstrap_tpr(tail, BOOT_FPRS, BOOT_RESAMPLES, BOOT_SEED)
    samples = np.nan_to_num(samples, nan=-1.0)  # -1: FPR not measurable in that resample
    boot = {"protocol": protocol_digest(tail), "seed": BOOT_SEED, "resamples": BOOT_RESAMPLES,
            "fprs": list(BOOT_FPRS), "scheme": "identities with replacement (ekd.eval.bootstrap)",
            "tpr_millionths": np.round(samples.T * 1e6).astype(int).tolist()}
    return boot, time.perf_counter() - t0


def all_pairs_tail(protocols, lookup: dict):  # noqa: ANN001
    """The bootstrap tail of LFW all-pairs from unit embeddings by path; the tail grows until
    every resample's threshold lies inside it."""
    from ekd.errors import DataError
    from ekd.eval.bootstrap import PairTail, bootstrap_tpr
    from ekd.eval.protocols import all_pairs_scores

    emb = np.stack([lookup[os.path.normpath(p)] for p in protocols.all_pairs_paths])
    scores, same = all_pairs_scores(emb, protocols.all_pairs_labels)
    for factor in (4.0, 8.0, 16.0, 64.0):
        tail = PairTail.from_all_pairs(scores, same, protocols.all_pairs_labels, max(BOOT_FPRS), factor)
        try:
            bootstrap_tpr(tail, BOOT_FPRS[:1], BOOT_RESAMPLES, BOOT_SEED)
            return tail
        except DataError:
            continue
    raise DataError("LFW all-pairs: even a 64x tail does not hold every resample's threshold")


def auto_weight_events(run_dir: Path) -> list[dict]:
    """The weights a run fixed for its ``weight: auto`` distillers (``auto_weight`` rows of its
    ``metrics.jsonl``; ekd.engine.auto_weight)."""
    file = Path(run_dir) / "metrics.jsonl"
    if not file.is_file():
        return []
    return [row["auto_weight"] for line in file.read_text().splitlines()
            if line.strip() and "auto_weight" in (row := json.loads(line))]


#: LFW pairs are half genuine: below this accuracy a student has learnt nothing usable.
CHANCE_ACC = 0.55


def keep_training_log(store_root: Path, name: str, metrics: dict, run_dir: Path) -> str | None:
    """A cell that trained to chance keeps its ``metrics.jsonl`` (gzipped, beside its record) so
    that the divergence can be replayed (``ekd.engine.guard.replay``) on any machine; returns the
    file name written, or None for a healthy cell or a run without a log."""
    log_file = Path(run_dir) / "metrics.jsonl"
    if (metrics.get("lfw_acc") or 0.0) >= CHANCE_ACC or not log_file.is_file():
        return None
    target = Path(store_root) / f"{name}.metrics.jsonl.gz"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    with open(log_file, "rb") as src, gzip.GzipFile(tmp, "wb", mtime=0) as dst:
        shutil.copyfileobj(src, dst)
    os.replace(tmp, target)
    return target.name


def cell_record(spec: dict, metrics: dict, seconds: dict, tail_n: int, extra: dict) -> dict:
    """The committed JSON of one finished cell."""
    return {"schema": SCHEMA, **spec["meta"], "name": spec["name"], "hash": spec["hash"],
            "profile": spec["profile"], "config": spec["portable_config"], "metrics": metrics,
            "train_seconds": seconds["train"], "eval_seconds": seconds["eval"],
            "bootstrap_seconds": seconds["bootstrap"], "bootstrap_tail_impostors": tail_n,
            "git_commit": git("rev-parse", "HEAD"),
            "git_dirty": bool(git("status", "--porcelain", "--", "src", "bench", "configs")),
            "environment": environment(), **extra}


def timed(clock: Path, work):  # noqa: ANN001, ANN201
    """``(work(), seconds)`` where seconds include every earlier invocation recorded in ``clock``
    (JSON ``{"seconds": s}``), which is updated even when ``work`` is interrupted."""
    prior = json.loads(clock.read_text())["seconds"] if clock.is_file() else 0.0
    start = time.perf_counter()
    try:
        result = work()
    finally:
        _atomic(clock, json.dumps({"seconds": prior + time.perf_counter() - start}))
    return result, prior + time.perf_counter() - start


LOCK = "running.pid"  # in a cell's cache folder: the process training/evaluating it


def lock_holder(cell_dir: Path) -> int | None:
    """The live process that holds ``cell_dir``'s lock, or None (no lock, or its process ended)."""
    try:
        pid = int((Path(cell_dir) / LOCK).read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def hold_lock(cell_dir: Path) -> None:
    """Mark ``cell_dir`` as run by this process until it exits, so that a second runner on the
    same cache skips the cell instead of training it twice into the same checkpoints."""
    import atexit

    holder = lock_holder(cell_dir)
    if holder is not None and holder != os.getpid():
        raise SystemExit(f"{cell_dir}: already running in process {holder}")
    lock = Path(cell_dir) / LOCK
    lock.write_text(str(os.getpid()))
    atexit.register(lambda: lock.unlink(missing_ok=True))


def train_cell(cell_dir: Path) -> tuple[dict, object, float]:
    """Train the cell of ``cell_dir/cell.json`` (resuming a half-done run): its spec, the
    :class:`ekd.engine.trainer.TrainResult` and the training seconds of all invocations. The
    calling process holds the cell's lock (:func:`hold_lock`) from here until it exits."""
    import torch

    from ekd.config import Config, from_dict, validate
    from ekd.engine.trainer import train

    hold_lock(cell_dir)
    spec = json.loads((cell_dir / "cell.json").read_text())
    torch.set_num_threads(int(spec["threads"]))
    tree = json.loads(json.dumps(spec["config"]))
    run = cell_dir / "run"
    if (run / "checkpoints" / "last.pt").is_file():  # a half-trained cell resumes from its last epoch
        tree["train"].update({"output_dir": str(run), "resume": "auto"})
    else:  # stopped before its first epoch checkpoint: nothing to resume, start the cell again
        tree["train"].update({"output_dir": str(run), "overwrite": True})
    cfg = from_dict(Config, tree)
    validate(cfg)
    trained, train_s = timed(cell_dir / "train_clock.json", lambda: train(cfg))
    if trained.interrupted:
        raise SystemExit(f"{cell_dir}: interrupted; rerun to resume")
    return spec, trained, train_s


def common_arguments(ap, results: Path) -> None:  # noqa: ANN001 - an argparse.ArgumentParser
    """``--faces --cache --results --out --jobs --budget --report-only`` of the bench commands."""
    ap.add_argument("--faces", type=Path, default=REPO.parent / "shared" / "data" / "faces")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get(
        "EKD_KD_TABLE_CACHE", Path.home() / ".cache" / "ekd" / "kd_table")))
    ap.add_argument("--results", type=Path, default=results, help="committed per-cell results")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds: start no cell after it, interrupt running ones at it (they resume)")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the report")


def run_and_report(table, faces: Path, jobs: int, budget: float | None, report_only: bool,  # noqa: ANN001
                   write_report) -> int:  # noqa: ANN001
    """The tail of every bench command: prepare and run the pending cells (unless
    ``report_only``; nothing without the real faces), then ``write_report()``."""
    if not report_only:
        if not (faces / "teacher_dlib_r29").is_dir():
            print(f"real faces not found at {faces} (see --faces): nothing to run")
            return 0
        table.prepare()
        run_all(table, jobs, budget)
    print(f"report written to {write_report()}")
    return 0


def run_cell(cell_dir: Path) -> None:
    """Train (resuming a half-done run), evaluate, bootstrap one cell; writes the committed files
    and ``result.json`` in the cache. ``train_seconds`` sums every invocation of the cell (the
    cache's ``train_clock.json`` carries the time of interrupted ones)."""
    from bench.kd_protocols import embed_student, load_eval_images, load_protocols, metrics_from_embeddings
    from ekd.models.loading import load_model

    spec, trained, train_s = train_cell(cell_dir)
    faces, cache = Path(spec["faces"]), Path(spec["cache"])
    protocols = load_protocols(faces)
    paths, images = load_eval_images(protocols, spec["input_size"], cache)
    model = load_model(trained.model_path).model.eval()
    t0 = time.perf_counter()
    lookup = embed_student(model, paths, images, spec.get("eval_device", "cpu"))
    metrics = metrics_from_embeddings(protocols, lookup)
    eval_s = time.perf_counter() - t0
    tail = all_pairs_tail(protocols, lookup)
    np.savez_compressed(cell_dir / "tail.npz", **tail.to_arrays())
    boot, boot_s = bootstrap_record(tail)
    seconds = {"train": train_s, "eval": eval_s, "bootstrap": boot_s}
    kept = keep_training_log(Path(spec["results"]), spec["name"], metrics, trained.run_dir)
    record = cell_record(spec, metrics, seconds, int(tail.neg_scores.size),
                         {"final_terms": trained.final_terms, "auto_weights": auto_weight_events(trained.run_dir),
                          **({"training_log": kept} if kept else {})})
    CellStore(Path(spec["results"])).write(spec["name"], record, boot)
    _atomic(cell_dir / "result.json", json.dumps(record, indent=1, default=float))


RUNNER = "bench.kd_table"  # the command whose ``--run-cell`` runs one cell (a table's ``runner`` overrides it)


def cell_command(runner: str | Path) -> list[str]:
    """The command line that starts ``runner``: a module (``bench.kd_table``) as ``python -m``
    from the repository root (the cell subprocesses run there), or a script file."""
    return [sys.executable, str(runner)] if isinstance(runner, Path) else [sys.executable, "-m", runner]


def run_all(table, jobs: int, budget_s: float | None = None) -> float:  # noqa: ANN001
    """Run every missing cell of ``table``, ``jobs`` at a time, re-planning as results arrive.

    With ``budget_s``, no cell starts after the budget and running ones are interrupted at it
    (SIGINT: they keep their last epoch checkpoint and resume on the next invocation).
    """
    from tqdm import tqdm

    running: dict[str, tuple[subprocess.Popen, str, float]] = {}
    failed: set[str] = set()
    bar = tqdm(desc=f"KD cells ({table.profile.name})", unit="cell", dynamic_ncols=True)
    start = time.perf_counter()
    replan = True  # planning reads every committed record: only when a cell has ended
    while True:
        over = budget_s is not None and time.perf_counter() - start > budget_s
        pending = []
        if replan and not over:
            if hasattr(table, "refresh"):  # choices committed since the last plan (a v3 table's tuned settings)
                table.refresh()
            pending = [job for job in table.pending() if str(job[1]) not in running and str(job[1]) not in failed
                       and lock_holder(job[1]) is None]  # not run by another runner on this cache
            plan = table.plan()
            bar.total, bar.n = len(plan), sum(1 for c in plan if table.result(c))
            bar.refresh()
        replan = False
        while pending and len(running) < jobs:
            name, d, spec = pending.pop(0)
            table.write_cell(d, spec)
            env = {**os.environ, "OMP_NUM_THREADS": str(table.profile.threads)}
            with open(d / "log.txt", "a") as log:  # the child keeps its own handle
                proc = subprocess.Popen([*cell_command(getattr(table, "runner", RUNNER)), "--run-cell", str(d)],
                                        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
            running[str(d)] = (proc, name, time.perf_counter())
            bar.set_postfix_str(", ".join(v[1] for v in running.values()))
        if not running:
            break
        time.sleep(2)
        if over:
            for proc, _, _ in running.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
        for key, (proc, name, t0) in list(running.items()):
            if proc.poll() is not None:
                del running[key]
                replan = True
                if over and proc.returncode != 0:
                    tqdm.write(f"cell {name} stopped at the time budget; rerun to resume")
                elif proc.returncode != 0:
                    failed.add(key)
                    tqdm.write(f"cell {name} failed (exit {proc.returncode}); see {key}/log.txt")
                else:
                    tqdm.write(f"cell {name} done in {(time.perf_counter() - t0) / 60:.1f} min")
    bar.close()
    if failed:
        raise SystemExit(f"{len(failed)} cell(s) failed: " + ", ".join(sorted(failed)))
    return time.perf_counter() - start
