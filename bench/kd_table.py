"""The real-face KD table: teacher, no-KD student, every distiller and the EKD variants.

Data and protocols follow ``../shared/data/faces/README.md``: students train on ``train/``
(CelebA-299 + CFP identities 001-450) and are scored on LFW View-2 (10-fold accuracy), LFW
all-pairs (TPR at FPR 1e-3/1e-4/1e-5) and CFP fold 10 (FF, FP), see ``kd_protocols.py``.

Teachers: **T2** is the shared pretrained dlib ResNet (128-d), used through an embedding cache
imported from ``teacher_dlib_r29/train.npz``; classifier-needing methods (kd, margin_distill,
proxylesskd, gkd) use the normalised mean teacher embedding of each identity as its class centre
(``teacher.centers: mean_embedding``). **T1** (GPU profile only) is an IResNet-50 trained here
on ``train/`` with ArcFace, as in the paper.

A *cell* is one (teacher, student width, method, seed) training + evaluation. Its config is
hashed (paths replaced by placeholders; loader settings such as workers and preloading left out)
and a finished cell writes its committed JSON under ``bench/results/kd_table/<profile>/``
(``kd_cells.py``); the cache ``<cache>/cells/<name>-<hash>/`` holds the run (a half-trained cell
resumes from its last epoch checkpoint). A rerun skips committed cells. Cells run as
subprocesses, ``--jobs`` at a time with ``--threads`` torch threads each.

Profiles (``kd_profiles.py``): ``cpu`` (v1, 32 px, 2 epochs; kept reproducible), ``cpu2`` (v2:
two students, MobileFaceNet and ``model.width: 0.5``, schedule fixed by ``kd_convergence.py``),
``gpu`` (112 px, T1 + T2). The report (``kd_report.py``) writes ``docs/results/``.

Usage::

    python -m bench.kd_table                      # CPU profile (default), 2 jobs x 1 thread
    python -m bench.kd_table --profile cpu2       # v2 table
    python -m bench.kd_table --profile gpu --budget 540   # one <= 600 s command; rerun resumes
    python -m bench.kd_table --report-only        # rewrite the report from committed cells

Options: ``--faces`` (default ``../shared/data/faces`` beside the repository), ``--cache``
(default ``$EKD_KD_TABLE_CACHE`` or ``~/.cache/ekd/kd_table``), ``--out`` (``docs/results``),
``--results`` (``bench/results/kd_table``), ``--smoke`` (1 epoch of 2 steps, own results folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path

from bench.kd_choices import PRESET_ROWS, PRESET_SEEDS, tuned_settings, tuning_records
from bench.kd_cells import (RESULTS, CellStore, recorded_channels_last, recorded_compile, run_all,  # noqa: F401
                            run_cell)
from bench.kd_profiles import (CPU, CPU2, CPU3, EKD_OURS, GPU, OTHERS, PLANS,  # noqa: F401
                               PROFILES, SEEDED, TEACHER_EMBEDDINGS, Cell, Profile, best_of, method_distill,
                               zoo_distill)
from ekd.distill import DISTILLERS, Distiller, needs_teacher_classifier

REPO = Path(__file__).resolve().parents[1]
TUNING = REPO / "bench" / "results" / "kd_tuning"  # the validation-split choices (bench/kd_tuning.py)
HASH_VERSION = 1  # bump when the evaluation of a cell changes
LOADER_KEYS = ("num_workers", "preload", "preload_max_gb")  # how data is loaded, not what
LAYOUT_KEYS = ("channels_last", "compile")  # train.*: layout, compiled step (rounding only), recorded, not hashed
# train.guard is off in cells: a diverged run is a result of the table (named "trained to chance"
# by the report), not an error; recorded, not hashed (it changes nothing in a run that completes).
RUN_CONTROL_KEYS = ("guard",)


class Table:
    """Builds cell configs for a profile and runs/collects its cells (cache + committed store)."""

    def __init__(self, profile: Profile, faces: Path, cache: Path, results: Path | None = None,
                 tuning: Path | None = None) -> None:
        self.profile, self.faces, self.cache = profile, faces.resolve(), cache.resolve()
        self.tuning = tuning or TUNING
        self.refresh()
        self.store = CellStore((results or RESULTS) / profile.name)

    def refresh(self) -> None:
        """Read again what the validation split has chosen (v3 profiles: ``bench/kd_tuning.py``'s
        committed cells), so that a runner's next plan has the choices committed since it started."""
        if self.profile.plan == "v3":
            tuned, _ = tuned_settings(tuning_records(self.tuning / self.profile.name), PRESET_ROWS, PRESET_SEEDS)
            self.profile = dataclasses.replace(self.profile, tuned=tuned)

    # -- configs ------------------------------------------------------------------------
    def teacher_section(self, teacher: str, method: str) -> dict:
        if method == "no KD":
            return {"kind": "none"}
        center = {"center": self.profile.teacher_center} if self.profile.teacher_center != "none" else {}
        if teacher in TEACHER_EMBEDDINGS:
            return {"kind": "cache", "path": str(self.cache / f"teacher_{teacher.lower()}"),
                    "centers": "mean_embedding" if needs_teacher_classifier(DISTILLERS.get(method, Distiller))
                    else "classifier", **center}
        return {"kind": "checkpoint", "path": str(self.t1_dir() / "run" / "model.pt"), **center}

    def config_tree(self, cell: Cell) -> dict:
        p = self.profile
        emb = 128 if cell.teacher in TEACHER_EMBEDDINGS else p.t1.get("embedding_size", 512)
        model = {"backbone": "mobilefacenet", "embedding_size": emb}
        if cell.width != 1.0:  # absent at full width, so v1 hashes are unchanged
            model["width"] = cell.width
        data = {"kind": "folder", "root": str(self.faces / "train"), "input_size": p.input_size,
                "num_workers": p.num_workers}
        if p.preload:
            data["preload"] = True
        return {
            "data": data,
            "sampler": {"random_size": p.random_size, "identities_per_batch": p.identities_per_batch,
                        "samples_per_identity": p.samples_per_identity},
            "model": model,
            "head": dict(p.head),
            "teacher": self.teacher_section(cell.teacher, cell.method),
            "distill": method_distill(cell.method, cell.teacher, p.plan, p.tuned, p.auto_target_share),
            "optim": dict(p.optim),
            "train": {"epochs": p.epochs, "device": p.device, "seed": cell.seed, "ce_on": "all",
                      "progress": False, "log_every": 20, "amp": "bf16" if p.device == "cuda" else "none",
                      "max_steps_per_epoch": p.steps_per_epoch, "channels_last": p.channels_last,
                      "compile": p.compile, "guard": {"enabled": False}},
        }

    def portable(self, tree: dict) -> dict:
        """``tree`` with the faces and cache folders replaced by ``<faces>`` / ``<cache>``."""
        text = json.dumps(tree, sort_keys=True)
        return json.loads(text.replace(str(self.faces), "<faces>").replace(str(self.cache), "<cache>"))

    def digest(self, tree: dict) -> str:
        """Hash of everything that changes a cell's result (not paths, loader settings or memory layout)."""
        tree = {**tree, "data": {k: v for k, v in tree["data"].items() if k not in LOADER_KEYS},
                "train": {k: v for k, v in tree["train"].items() if k not in LAYOUT_KEYS + RUN_CONTROL_KEYS}}
        text = json.dumps({"v": HASH_VERSION, "cfg": tree}, sort_keys=True)
        text = text.replace(str(self.faces), "<faces>").replace(str(self.cache), "<cache>")
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def cell_name(self, cell: Cell) -> str:
        return f"{cell.slug}-{self.digest(self.config_tree(cell))}"

    def cell_dir(self, cell: Cell) -> Path:
        return self.cache / "cells" / self.cell_name(cell)

    def t1_tree(self) -> dict:
        tree = self.config_tree(Cell("T1", "no KD", 0))
        tree["model"] = {"backbone": self.profile.t1["backbone"],
                         "embedding_size": self.profile.t1["embedding_size"]}
        tree["train"]["epochs"] = self.profile.t1["epochs"]
        return tree

    def t1_name(self) -> str:
        return f"T1-teacher-{self.digest(self.t1_tree())}"

    def t1_dir(self) -> Path:
        return self.cache / "cells" / self.t1_name()

    # -- results ------------------------------------------------------------------------
    def result(self, cell: Cell) -> dict | None:
        """The committed record of ``cell``, else a finished run in the cache, else None."""
        committed = self.store.load(self.cell_name(cell))
        if committed is not None:
            return committed
        file = self.cell_dir(cell) / "result.json"
        return json.loads(file.read_text()) if file.is_file() else None

    def plan(self) -> list[Cell]:
        """Every cell of the table whose seeds are known now (later phases need earlier results)."""
        return PLANS[self.profile.plan](self.profile, self.result)

    def best_others(self, teacher: str) -> list[str] | None:
        """The two best other distillers of the one-seed sweep (None until it is complete)."""
        return best_of(OTHERS, teacher, self.result, 2)

    def teachers(self) -> dict[str, dict]:
        """Committed teacher records by teacher name (T2 written by :meth:`prepare`)."""
        out = {}
        for t in self.profile.teachers:
            r = self.store.load(self.t1_name() if t == "T1" else f"{t}-teacher")
            if r is not None:
                out[t] = r
        return out

    # -- preparation ----------------------------------------------------------------------
    def prepare(self) -> None:
        """The embedding caches and committed records of the stored-embedding teachers (T2, T3),
        the decoded evaluation images (once)."""
        from ekd.data import ImageFolderDataset
        from ekd.teachers.cache_builder import import_npz

        self.cache.mkdir(parents=True, exist_ok=True)
        stored = [t for t in self.profile.teachers if t in TEACHER_EMBEDDINGS]
        for t in stored:
            if not (self.cache / f"teacher_{t.lower()}" / "manifest.json").is_file():
                dataset = ImageFolderDataset(self.faces / "train", input_size=self.profile.input_size)
                import_npz(self.faces / TEACHER_EMBEDDINGS[t] / "train.npz", dataset, self.cache / f"teacher_{t.lower()}")
        from bench.kd_protocols import load_eval_images, load_protocols

        protocols = load_protocols(self.faces)
        load_eval_images(protocols, self.profile.input_size, self.cache)
        for t in stored:
            if self.store.load(f"{t}-teacher") is None:
                self.write_teacher_record(t, protocols)

    def write_teacher_record(self, teacher: str, protocols) -> None:  # noqa: ANN001
        """``<teacher>-teacher``: a stored-embedding teacher's metrics and bootstrap samples."""
        from bench.kd_cells import all_pairs_tail, bootstrap_record, environment, git
        from bench.kd_protocols import metrics_from_embeddings, teacher_lookup

        folder = TEACHER_EMBEDDINGS[teacher]
        lookup = teacher_lookup(self.faces, folder)
        boot, seconds = bootstrap_record(all_pairs_tail(protocols, lookup))
        name = f"{teacher}-teacher"
        record = {"teacher": teacher, "method": "teacher", "seed": None, "name": name,
                  "metrics": metrics_from_embeddings(protocols, lookup),
                  "source": f"{folder}/{{lfw,cfp}}.npz (emb + emb_flip)", "bootstrap_seconds": seconds,
                  "git_commit": git("rev-parse", "HEAD"), "environment": environment()}
        self.store.write(name, record, boot)

    def spec(self, name: str, tree: dict, meta: dict) -> dict:
        p = self.profile
        return {"config": tree, "portable_config": self.portable(tree), "meta": meta, "name": name,
                "hash": name.rsplit("-", 1)[1], "profile": p.name, "faces": str(self.faces),
                "cache": str(self.cache), "results": str(self.store.root), "input_size": p.input_size,
                "threads": p.threads, "eval_device": "cuda" if p.device == "cuda" else "cpu"}

    def pending(self) -> list[tuple[str, Path, dict]]:
        """Cells still to run, as (name, cache folder, spec); T1 first when needed. Of several
        cells with one config only the first runs; the others adopt its record when it is in
        (:meth:`adopt_same_config`)."""
        if self.needs_t1():
            meta = {"teacher": "T1", "method": "teacher", "seed": 0, "width": 1.0}
            return [(self.t1_name(), self.t1_dir(), self.spec(self.t1_name(), self.t1_tree(), meta))]
        self.adopt_same_config()
        jobs, hashes = [], set()
        for cell in self.plan():
            name = self.cell_name(cell)
            if self.store.load(name) is None and name.rsplit("-", 1)[1] not in hashes:
                hashes.add(name.rsplit("-", 1)[1])
                meta = {"teacher": cell.teacher, "method": cell.method, "seed": cell.seed, "width": cell.width}
                jobs.append((name, self.cell_dir(cell), self.spec(name, self.config_tree(cell), meta)))
        return jobs

    def adopt_same_config(self) -> list[str]:
        """Commit each planned cell whose config is that of a committed cell of another row (same
        hash: same teacher, seed, width and losses, e.g. "EKD (ours)" when the validation split
        chose the authors' settings) as a copy of it with ``adopted_from``, instead of training the
        same run twice; returns the names written."""
        plan = [(cell, self.cell_name(cell)) for cell in self.plan()]
        committed = {name.rsplit("-", 1)[1]: name for _, name in plan if self.store.load(name) is not None}
        written = []
        for cell, name in plan:
            origin = committed.get(name.rsplit("-", 1)[1])
            if origin is None or origin == name or self.store.load(name) is not None:
                continue
            self._copy_cell(self.store, origin, name, self.profile.name, method=cell.method)
            written.append(name)
        return written

    def needs_t1(self) -> bool:
        """T1 must (re)train: no committed record, or T1 cells pending and its model not in the
        cache (models are not committed)."""
        if not self.profile.t1:
            return False
        if self.store.load(self.t1_name()) is None:
            return True
        if (self.t1_dir() / "run" / "model.pt").is_file():
            return False
        return any(c.teacher == "T1" and c.method != "no KD" and self.store.load(self.cell_name(c)) is None
                   for c in self.plan())

    def commit_cached(self) -> list[str]:
        """Commit cells finished in the cache before the store existed (v1 ``result.json``): the
        record gets the cell's hash and portable config, no bootstrap samples (no tail was kept)
        and ``migrated_from_cache``. Returns the names written."""
        written = []
        for cell in self.plan():
            name, file = self.cell_name(cell), self.cell_dir(cell) / "result.json"
            if self.store.load(name) is None and file.is_file():
                r = json.loads(file.read_text())
                record = {"width": cell.width, **r, "name": name, "hash": name.rsplit("-", 1)[1],
                          "profile": self.profile.name, "config": self.portable(self.config_tree(cell)),
                          "git_commit": r.get("git_commit", "unknown"), "migrated_from_cache": True}
                self.store.write(name, record, None)
                written.append(name)
        return written

    def adopt_convergence(self) -> list[str]:
        """Commit the convergence sweep's no-KD cells at this profile's size and epochs as this
        table's no-KD cells (same config, same hash: ``kd_convergence.py``); returns the names."""
        prefix = f"{self.profile.input_size}px-{self.profile.epochs}ep-"
        return self._adopt_no_kd(self.store.root.parent, "convergence", lambda name: prefix + name)

    def adopt_no_kd(self, source_profile: str = "cpu2") -> list[str]:
        """Commit ``source_profile``'s no-KD cells as this table's where the config is the same (a
        no-KD cell has no teacher, so it has the same hash under another teacher); returns the
        names written."""
        return self._adopt_no_kd(self.store.root.parent, source_profile, lambda name: "T2-" + name.split("-", 1)[1])

    def _adopt_no_kd(self, results: Path, folder: str, origin_of) -> list[str]:  # noqa: ANN001 - name -> str
        """Copy each no-KD cell of ``results/folder`` named ``origin_of(name)`` whose hash is this
        table's cell's, with its bootstrap samples and ``adopted_from: folder/origin``."""
        source = CellStore(results / folder)
        written = []
        for cell in self.plan():
            name = self.cell_name(cell)
            if cell.method != "no KD" or self.store.load(name) is not None or source.root == self.store.root:
                continue
            origin = origin_of(name)
            record = source.load(origin)
            if record is None or record.get("hash") != name.rsplit("-", 1)[1]:
                continue
            self._copy_cell(source, origin, name, folder, profile=self.profile.name, teacher=cell.teacher)
            written.append(name)
        return written

    def _copy_cell(self, source: CellStore, origin: str, name: str, folder: str, **fields: str) -> None:
        """Commit ``source``'s record ``origin`` (and its bootstrap samples) as cell ``name`` with
        ``fields`` changed and ``adopted_from: folder/origin``."""
        boot = source.root / f"{origin}.boot.json"
        self.store.write(name, {**source.load(origin), "name": name, **fields, "adopted_from": f"{folder}/{origin}"},
                         json.loads(boot.read_text()) if boot.is_file() else None)

    def write_cell(self, cell_dir: Path, spec: dict) -> None:
        cell_dir.mkdir(parents=True, exist_ok=True)
        (cell_dir / "cell.json").write_text(json.dumps(spec, indent=1))


def smoke(profile: Profile) -> Profile:
    """A tiny version of ``profile`` that runs every code path (1 epoch of 2 steps, 32 px, CPU)."""
    t1 = {**profile.t1, "epochs": 1} if profile.t1 else {}
    return dataclasses.replace(profile, name=f"{profile.name}-smoke", input_size=32, epochs=1,
                               steps_per_epoch=2, device="cpu", num_workers=0, jobs=1, threads=2,
                               t1=t1, random_size=16, identities_per_batch=4)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    ap.add_argument("--faces", type=Path, default=REPO.parent / "shared" / "data" / "faces")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get(
        "EKD_KD_TABLE_CACHE", Path.home() / ".cache" / "ekd" / "kd_table")))
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    ap.add_argument("--results", type=Path, default=RESULTS, help="committed per-cell results")
    ap.add_argument("--jobs", type=int, default=None, help="cells at a time (profile default)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds: start no cell after it, interrupt running ones at it (they resume)")
    ap.add_argument("--smoke", action="store_true", help="tiny steps on CPU, own results folder")
    ap.add_argument("--only", type=int, default=None, help="run at most this many pending cells")
    ap.add_argument("--match", default="", help="run only pending cells whose name contains this")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the report")
    ap.add_argument("--reproduce", metavar="NAME",
                    help="retrain a committed cell from scratch and compare its metrics")
    ap.add_argument("--run-cell", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.run_cell:
        run_cell(args.run_cell)
        return 0
    profile = smoke(PROFILES[args.profile]) if args.smoke else PROFILES[args.profile]
    if args.smoke:  # never next to the committed results
        args.results, args.out = args.cache / "smoke-results", args.cache / "smoke-report"
    table = Table(profile, args.faces, args.cache, args.results)
    if args.reproduce:
        print(json.dumps(reproduce(table, args.reproduce), indent=1))
        return 0
    wall = 0.0
    if not args.report_only:
        if not (args.faces / "teacher_dlib_r29").is_dir():
            print(f"real faces not found at {args.faces} (see --faces): nothing to run")
            return 0
        table.prepare()
        for name in table.commit_cached():
            print(f"committed {name} from the cache (no bootstrap samples)")
        for name in table.adopt_convergence():
            print(f"committed {name} from the convergence sweep")
        if profile.plan == "v3":
            for name in table.adopt_no_kd():
                print(f"committed {name} from the cpu2 table (no KD: same config, same hash)")
        if args.only is not None or args.match:
            table = LimitedTable(table, args.only, args.match)
        wall = run_all(table, args.jobs or profile.jobs, args.budget)
    from bench.kd_report import write_report

    out = write_report(table, args.out, wall, ["python", "-m", "bench.kd_table", *sys.argv[1:]])
    print(f"report written to {out}")
    if not args.smoke and args.out.resolve() == (REPO / "docs" / "results").resolve():
        from bench.kd_summary import update_readme

        block = (args.out / f"kd_table_{profile.name}_summary.md").read_text().rstrip("\n")
        if update_readme(REPO / "README.md", profile.name, block):
            print("README.md results block rewritten")
    return 0


def reproduce(table: Table, name: str, run=run_cell) -> dict:  # noqa: ANN001 - run(cell_dir)
    """Retrain committed cell ``name`` from scratch (its own cache folder, its own results
    store) with ``run`` (the command's own cell runner) and write
    ``<results>/<profile>/reproduced/<name>.json``: both metric sets and the largest absolute
    difference."""
    import shutil

    committed = table.store.load(name)
    if committed is None:
        raise SystemExit(f"{name}: not a committed cell of profile {table.profile.name}")
    cell = Cell(committed["teacher"], committed["method"], committed["seed"], committed.get("width", 1.0))
    if table.cell_name(cell) != name:
        raise SystemExit(f"{name}: this code gives the cell the name {table.cell_name(cell)}; "
                         "its config changed since it was committed")
    table.prepare()
    scratch = table.cache / "reproduce" / name
    shutil.rmtree(scratch, ignore_errors=True)
    meta = {k: committed[k] for k in ("teacher", "method", "seed", "width")}
    tree = table.config_tree(cell)
    # the committed cell's memory layout and step (records without the keys ran NCHW, eager)
    tree["train"]["channels_last"] = recorded_channels_last(committed)
    tree["train"]["compile"] = recorded_compile(committed)
    spec = table.spec(name, tree, meta)
    spec["results"] = str(scratch / "results")
    table.write_cell(scratch, spec)
    run(scratch)
    again = CellStore(scratch / "results").load(name)
    keys = [k for k, v in committed["metrics"].items() if isinstance(v, (int, float))]
    diff = {k: abs(again["metrics"][k] - committed["metrics"][k]) for k in keys
            if isinstance(again["metrics"].get(k), (int, float))}
    out = {"name": name, "committed": {k: committed["metrics"][k] for k in keys},
           "rerun": {k: again["metrics"][k] for k in keys}, "abs_diff": diff,
           "max_abs_diff": max(diff.values(), default=0.0), "rerun_train_seconds": again["train_seconds"],
           "git_commit": again["git_commit"], "environment": again["environment"]}
    CellStore(table.store.root / "reproduced").write(name, out, None)
    return out


class LimitedTable:
    """A :class:`Table` whose ``pending`` hands out only cells whose name contains ``match`` (and
    T1, which they may need), at most ``n`` of them."""

    def __init__(self, table: Table, n: int | None, match: str = "") -> None:
        self._table, self._n, self._match = table, n if n is not None else 1 << 30, match
        self._given: set[str] = set()

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._table, name)

    def pending(self) -> list[tuple[str, Path, dict]]:
        jobs = [j for j in self._table.pending() if self._match in j[0] or j[0].startswith("T1-teacher")]
        if len(self._given) >= self._n:
            return [j for j in jobs if j[0] in self._given]
        for j in jobs[: self._n - len(self._given)]:
            self._given.add(j[0])
        return [j for j in jobs if j[0] in self._given]


if __name__ == "__main__":
    sys.exit(main())
