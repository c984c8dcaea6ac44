"""EKD ablation on a validation split of the training identities (never on LFW/CFP).

Split: the identity folders of ``faces/train`` sorted by name, permuted with
``numpy.random.default_rng(SPLIT_SEED)``; the first ``VAL_SHARE`` (10%, rounded) are the
validation identities, the rest train. The split is materialised as two folders of symlinks in
the cache (``<cache>/ablation/{train,val}/<identity>``), and the shared teacher's embeddings of the
training part are imported into ``<cache>/ablation/teacher_t2``.

Cells: the half-width MobileFaceNet (``model.width: 0.5``, the student the target is set for)
with the cpu2 schedule (``bench/kd_profiles.py``: size, epochs, batch, CosFace, SGD) and T2, one
per (row, seed), rows = :data:`ROWS` (no KD, EKD (authors), EKD (ours), and EKD (ours) with one
variant of ``distill/ekd.py`` each; ``docs/methods.md``, "EKD variants"). A cell trains on the
train part and is scored on the validation part: all pairs over every image of the validation
identities, TPR at FPR 1e-3 / 1e-4 / 1e-5 and AUC; the teacher is scored the same way from its
stored embeddings. Each finished cell writes ``bench/results/ekd_ablation/<profile>/<name>.json``
(committed; reruns skip it); :func:`report` writes ``docs/results/ekd_ablation.md`` from those
files alone.

    python -m bench.ekd_ablation [--seeds 2] [--rows ...] [--budget S] [--jobs 2]
    python -m bench.ekd_ablation --smoke        # 2 steps per cell: the path
    python -m bench.ekd_ablation --report-only
    python -m bench.ekd_ablation --reproduce NAME   # retrain one committed cell, compare
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench.kd_cells import (CellStore, adopted_clause, auto_weight_events, cell_seconds, common_arguments,
                            environment, git, layout_summary, run_and_report, train_cell)
from bench.kd_choices import choose_preset
from bench.kd_profiles import CPU2, TEACHER_EMBEDDINGS, Cell, Profile
from bench.kd_table import REPO, Table, reproduce, smoke

SPLIT_SEED = 20221  # fixed: the split never changes between machines or sessions
VAL_SHARE = 0.10
FPRS = (1e-3, 1e-4, 1e-5)
RESULTS = REPO / "bench" / "results" / "ekd_ablation"
WIDTH = 0.5


#: The "EKD (ours)" the variants start from: bench/kd_profiles.py's EKD_OURS as the ablation
#: began. Pinned here, so that adopting a preset there leaves these cells' hashes unchanged.
EKD_OURS = {"name": "ekd", "weight": 1.0,
            "params": {"bias_correction": True, "memory_size": 4096, "pos_weight": 0.16,
                       "neg_weight": 0.08}}


def _ours(**params: object) -> list[dict]:
    return [{**EKD_OURS, "params": {**EKD_OURS["params"], **params}}]


#: row name -> distill section (None = no KD). Every variant is EKD (ours) plus one option.
ROWS: dict[str, list[dict] | None] = {
    "no KD": None,
    "EKD (authors)": [{"name": "ekd", "weight": 1.0, "params": {}}],
    "EKD (ours)": _ours(),
    "ours + weight x4": [{**EKD_OURS, "weight": 4.0}],
    "ours + spread T": _ours(temperature_mode="spread", temperature_scale=0.1),
    "ours + teacher anchors": _ours(anchor_source="teacher"),
    "ours + teacher negatives": _ours(hard_negatives="teacher"),
    "ours + memory pairs": _ours(memory_pairs=True),
    "ours + focus 1e-4": _ours(focus_fpr=1e-4, focus_width=0.05),
    "ours + active mean": _ours(reduction="active"),
    # the anchors' EMA (momentum 0.01, ~100 steps) lags a fast-moving student's thresholds on
    # the validation split by 0.02-0.04 early in training (ekd diagnose on a real run)
    "ours + fast EMA": _ours(momentum=0.1),
    # added after the seed-0 cells above (LATE_ROWS)
    "ours + one-sided": _ours(one_sided=True),
    "ours + one-sided, negatives x8": _ours(one_sided=True, neg_weight=0.64),
    "ours + one-sided + spread T": _ours(one_sided=True, temperature_mode="spread", temperature_scale=0.1),
}
# rows added once other rows' cells had finished, and what prompted them (said in the report)
LATE_ROWS = {"ours + one-sided": "added after the seed-0 cells of the rows above it: at the end of the "
             "five of them with weight 1 and their own anchors, 61-72% of ekd_pos's squared rank error "
             "pulled positive pairs down "
             "(`bench/results/ekd_rank_direction.json`)",
             "ours + one-sided, negatives x8": "added after seed 0 of \"ours + one-sided\" (the only row "
             "then ahead of no KD at TPR@1e-4): `ekd diagnose` on that cell showed ekd_neg sending 1.4% of "
             "the CE's gradient into the embedding (ekd_pos 22.5%); one-sided, the negative term only ever "
             "pushes down hard negatives the student ranks above the teacher - the pairs that set the "
             "low-FPR thresholds - so its weight is raised x8 (0.08 -> 0.64, about a tenth of the CE's "
             "gradient, the level `ekd diagnose` suggests for a weak term)",
             "ours + one-sided + spread T": "the combination of the two rows that help by the preset rule "
             "once both had two seeds (one-sided: +0.0138 at TPR@1e-4 over EKD (ours), spread T: +0.0083; "
             "the rule asks for their combination as a row of its own before adopting one)"}


def split_identities(train_root: Path) -> tuple[list[str], list[str]]:
    """(train, validation) identity folder names (see the module docstring)."""
    ids = sorted(d.name for d in train_root.iterdir() if d.is_dir())
    order = np.random.default_rng(SPLIT_SEED).permutation(len(ids))
    n_val = int(round(VAL_SHARE * len(ids)))
    val = sorted(ids[i] for i in order[:n_val])
    return sorted(set(ids) - set(val)), val


class Ablation(Table):
    """The ablation cells as a table for :func:`kd_cells.run_all` (keys: (row, seed))."""

    runner = "bench.ekd_ablation"  # its --run-cell trains a cell on the split

    def __init__(self, profile: Profile, faces: Path, cache: Path, results: Path, rows: list[str],
                 seeds: int, teacher: str = "T2", row_configs: dict | None = None) -> None:
        super().__init__(dataclasses.replace(profile, name=f"ablation-{profile.name}", students=(WIDTH,)),
                         faces, cache, results)
        self.split = self.cache / "ablation"
        self.rows, self.seeds, self.teacher = rows, seeds, teacher
        self.row_configs = ROWS if row_configs is None else row_configs  # row name -> distill (None = no KD)

    @property
    def teacher_cache(self) -> Path:
        """The embedding cache of the split's train part for this teacher (``teacher_t2``, ...)."""
        return self.split / f"teacher_{self.teacher.lower()}"

    # -- configs ------------------------------------------------------------------------
    def config_tree(self, cell: Cell) -> dict:
        distill = self.row_configs[cell.method]
        base = "no KD" if distill is None else "EKD (authors)"  # teacher section of a KD row
        tree = super().config_tree(dataclasses.replace(cell, method=base))
        tree["data"]["root"] = str(self.split / "train")
        if tree["teacher"].get("kind") == "cache":
            tree["teacher"]["path"] = str(self.teacher_cache)
        tree["distill"] = json.loads(json.dumps(distill or []))
        # validation at every epoch end, so `ekd diagnose` sets EKD's anchors next to the
        # thresholds of the student's evaluation (the cell's score is computed after training)
        tree["val"] = {"sets": [{"path": str(self.split / "val"), "name": "val", "kind": "folder"}],
                       "max_per_identity": None, "resize": True}
        return tree

    def plan(self) -> list[Cell]:  # type: ignore[override]
        return [Cell(self.teacher, row, seed, WIDTH) for seed in range(self.seeds) for row in self.rows]

    def result(self, cell: Cell) -> dict | None:
        return self.store.load(self.cell_name(cell))

    def pending(self) -> list[tuple[str, Path, dict]]:
        jobs = []
        for cell in self.plan():
            name = self.cell_name(cell)
            if self.store.load(name) is None:
                meta = {"teacher": self.teacher, "method": cell.method, "seed": cell.seed, "width": WIDTH}
                jobs.append((name, self.cell_dir(cell), self.spec(name, self.config_tree(cell), meta)))
        return jobs

    # -- preparation ----------------------------------------------------------------------
    def prepare(self) -> None:
        """The split folders, the teacher cache of the train part, the teacher's record."""
        from ekd.data import ImageFolderDataset
        from ekd.teachers.cache_builder import import_npz

        train_ids, val_ids = split_identities(self.faces / "train")
        for part, ids in (("train", train_ids), ("val", val_ids)):
            folder = self.split / part
            folder.mkdir(parents=True, exist_ok=True)
            for i in ids:
                link = folder / i
                if not link.exists():
                    os.symlink(self.faces / "train" / i, link, target_is_directory=True)
        npz = TEACHER_EMBEDDINGS[self.teacher]
        if not (self.teacher_cache / "manifest.json").is_file():
            dataset = ImageFolderDataset(self.split / "train", input_size=self.profile.input_size)
            import_npz(self.faces / npz / "train.npz", dataset, self.teacher_cache)
        record = f"{self.teacher}-teacher"
        if self.store.load(record) is None:
            t0 = time.perf_counter()
            metrics = score(teacher_val_embeddings(self.faces, self.split / "val", npz), self.split / "val")
            self.store.write(record, {"method": "teacher", "name": record, "source": f"{npz}/train.npz",
                                      "metrics": metrics, "eval_seconds": time.perf_counter() - t0,
                                      "split": split_record(self.faces), "git_commit": git("rev-parse", "HEAD"),
                                      "environment": environment()}, None)


def split_record(faces: Path) -> dict:
    train_ids, val_ids = split_identities(faces / "train")
    return {"seed": SPLIT_SEED, "val_share": VAL_SHARE, "train_identities": len(train_ids),
            "val_identities": len(val_ids), "val_first": val_ids[:5]}


def val_images(val_root: Path) -> tuple[list[str], np.ndarray]:
    """Every image of the validation identities (relative ``<identity>/<file>``) and labels."""
    from ekd.data import ImageFolderDataset

    ds = ImageFolderDataset(val_root, train=False)
    rels = [os.path.relpath(p, val_root).replace(os.sep, "/") for p, _ in ds.samples]
    return rels, np.asarray(ds.labels)


def score(emb: np.ndarray, val_root: Path) -> dict:
    """All-pairs AUC and TPR at FPR over the validation identities from unit embeddings."""
    from ekd.eval.metrics import roc_auc, tpr_at_fpr
    from ekd.eval.protocols import all_pairs_scores

    _, labels = val_images(val_root)
    scores, same = all_pairs_scores(emb, labels)
    out = {f"val_tpr@{f:.0e}".replace("e-0", "e-"): v for f, v in tpr_at_fpr(scores, same, FPRS).items()}
    out.update({"val_auc": float(roc_auc(scores, same)), "val_pairs": int(scores.size),
                "val_images": int(len(labels))})
    return out


def teacher_val_embeddings(faces: Path, val_root: Path, folder: str = "teacher_dlib_r29") -> np.ndarray:
    """The stored teacher's unit embeddings (``emb + emb_flip`` of ``faces/<folder>/train.npz``) of
    every validation image, in :func:`val_images` order."""
    from ekd.eval.metrics import l2_normalize

    data = np.load(faces / folder / "train.npz")
    row = {str(p): i for i, p in enumerate(data["paths"])}
    rels, _ = val_images(val_root)
    idx = np.array([row[r] for r in rels])
    return l2_normalize(data["emb"][idx] + data["emb_flip"][idx]).astype(np.float32)


def run_cell(cell_dir: Path) -> None:
    """Train one cell (resuming), score it on the validation identities, commit its JSON."""
    from ekd.data import ListDataset
    from ekd.eval.flip_embed import embed_dataset
    from ekd.models.loading import load_model

    spec, trained, train_s = train_cell(cell_dir)
    val_root = Path(spec["cache"]) / "ablation" / "val"
    rels, _ = val_images(val_root)
    t0 = time.perf_counter()
    model = load_model(trained.model_path).model.eval()
    emb = embed_dataset(model, ListDataset([str(val_root / r) for r in rels], spec["input_size"]), 256,
                        spec.get("eval_device", "cpu"))
    metrics = score(emb, val_root)
    record = {**spec["meta"], "name": spec["name"], "hash": spec["hash"], "profile": spec["profile"],
              "config": spec["portable_config"], "metrics": metrics, "train_seconds": train_s,
              "eval_seconds": time.perf_counter() - t0, "final_terms": trained.final_terms,
              "auto_weights": auto_weight_events(trained.run_dir),
              "git_commit": git("rev-parse", "HEAD"), "environment": environment()}
    CellStore(Path(spec["results"])).write(spec["name"], record, None)


def collect_rows(table: Ablation) -> dict[str, list[dict]]:
    """Committed records of each row of ``table`` (row name -> its seeds' records)."""
    return {r: [x for s in range(table.seeds) if (x := table.result(Cell(table.teacher, r, s, WIDTH)))]
            for r in table.rows}


def rows_section(table: Ablation, rows: dict[str, list[dict]], title: str, command: str) -> list[str]:
    """The report's head and its table: one line per row, mean ± std over seeds, gap closed
    (teacher - no KD) at 1e-3 / 1e-4 on the validation split."""
    teacher = table.store.load(f"{table.teacher}-teacher")
    keys = ("val_tpr@1e-3", "val_tpr@1e-4", "val_tpr@1e-5", "val_auc")

    def mean(rs: list[dict], k: str) -> float | None:
        vals = [r["metrics"][k] for r in rs if r["metrics"].get(k) is not None]
        return statistics.mean(vals) if vals else None

    base = rows.get("no KD") or []
    lines = [f"# {title}", "",
             f"Half-width MobileFaceNet, {table.teacher}, the `{table.profile.name.removeprefix('ablation-')}` schedule "
             f"({table.profile.input_size} px, {table.profile.epochs} epochs); split seed {SPLIT_SEED}, "
             f"{VAL_SHARE:.0%} of the identities held out (`{command}`). All pairs over every "
             "validation image; nothing here looks at LFW or CFP.", ""]
    if teacher:
        m = teacher["metrics"]
        lines.append(f"Teacher ({table.teacher}) on the validation split: TPR@1e-3 {m['val_tpr@1e-3']:.4f}, "
                     f"TPR@1e-4 {m['val_tpr@1e-4']:.4f}, AUC {m['val_auc']:.4f}; "
                     f"{m['val_images']} images, {m['val_pairs']:,} pairs.")
        lines.append("")
    lines += ["| row | seeds | TPR@1e-3 | TPR@1e-4 | TPR@1e-5 | AUC | gap closed @1e-3 | gap closed @1e-4 | minutes/cell |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r, rs in rows.items():
        if not rs:
            lines.append(f"| {r} | 0 | (not run) | | | | | | |")
            continue
        cells = []
        for k in keys:
            vals = [x["metrics"][k] for x in rs if x["metrics"].get(k) is not None]
            sd = f" ± {statistics.stdev(vals):.4f}" if len(vals) > 1 else ""
            cells.append(f"{statistics.mean(vals):.4f}{sd}" if vals else "n/a")
        gaps = []
        for k in keys[:2]:
            t, b, v = teacher["metrics"][k] if teacher else None, mean(base, k), mean(rs, k)
            gaps.append(f"{(v - b) / (t - b):+.0%}" if None not in (t, b, v) and t != b else "n/a")
        minutes = statistics.mean(x["train_seconds"] + x["eval_seconds"] for x in rs) / 60
        lines.append(f"| {r} | {len(rs)} | " + " | ".join(cells + gaps) + f" | {minutes:.0f} |")
    return lines


def compute_lines(table: Ablation, rows: dict[str, list[dict]]) -> list[str]:
    """How many cells are committed, their summed time, their memory layout."""
    records = [x for rs in rows.values() for x in rs]
    compute = sum(cell_seconds(x) for x in records if "adopted_from" not in x)
    return [f"{len(records)} of {len(table.plan())} cells committed; {compute / 3600:.2f} h of cell time"
            f"{adopted_clause(records)}.", layout_summary(records)]


def report(table: Ablation, out: Path) -> Path:
    """``ekd_ablation.md`` from the committed cells (:func:`rows_section`), the late rows' reasons
    and the preset chosen by :func:`kd_choices.choose_preset`."""
    rows = collect_rows(table)
    lines = rows_section(table, rows, "EKD ablation on a validation split of the training identities",
                         "bench/ekd_ablation.py")
    lines += [""] + [f"- *{r}*: {why}." for r, why in LATE_ROWS.items() if r in rows]
    chosen, reasons = choose_preset(rows, table.seeds)
    lines += ["", "## The preset (`choose_preset`: rule fixed before any variant cell finished)", "",
              f"Chosen: **{chosen}**." if chosen else "Chosen: none yet.", ""]
    lines += [f"- {r}" for r in reasons]
    lines += [""] + compute_lines(table, rows) + [""]
    lines += tail_section(TAIL_RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ekd_ablation.md").write_text("\n".join(lines))
    return out / "ekd_ablation.md"


TAIL_RESULTS = REPO / "bench" / "results" / "ekd_tail_transfer.json"


def tail_section(path: Path) -> list[str]:
    """The committed tail-agreement rows (``bench/ekd_tail_transfer.py``), if any: how much of a
    student's low-FPR failures it shares with the teacher and with another no-KD student."""
    if not path.is_file():
        return []
    rows = json.loads(path.read_text())
    lines = ["## Whose tail does a student have? (`bench/ekd_tail_transfer.py`)", "",
             "On the validation pairs: *overlap@F* = share of the student's impostor pairs above its "
             "threshold at FPR F that are among the reference model's hardest 1% of impostors (1% by "
             "chance); *percentile@F* = median percentile, in the student's impostor order, of the "
             "reference's impostors above its own threshold at F; *impostor ρ* = Spearman over all "
             "impostor pairs. On this split F = 1e-4 is about 74 impostor pairs, 1e-3 about 740.", "",
             "| row | seed | reference | impostor ρ | overlap@1e-3 | overlap@1e-4 | percentile@1e-3 | percentile@1e-4 | TPR@1e-4 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['seed']} | {r.get('reference', 'teacher')} | {r['spearman_impostor']:.3f} | "
                     f"{r['tail_overlap@1e-3']:.1%} | {r['tail_overlap@1e-4']:.1%} | "
                     f"{r['reference_tail_percentile@1e-3']:.1f} | {r['reference_tail_percentile@1e-4']:.1f} | "
                     f"{r['tpr@1e-4']:.4f} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_arguments(ap, RESULTS)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="2 steps per cell, results in the cache")
    ap.add_argument("--reproduce", metavar="NAME",
                    help="retrain committed cell NAME from scratch and write reproduced/NAME.json")
    ap.add_argument("--run-cell", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.run_cell:
        run_cell(args.run_cell)
        return 0
    profile = CPU2
    if args.smoke:
        profile, args.seeds = smoke(CPU2), 1
        args.results, args.out = args.cache / "smoke-results", args.cache / "smoke-report"
    table = Ablation(profile, args.faces, args.cache, args.results, args.rows, args.seeds)
    if args.reproduce:
        print(json.dumps(reproduce(table, args.reproduce, run=run_cell), indent=1))
        return 0
    return run_and_report(table, args.faces, args.jobs, args.budget, args.report_only,
                          lambda: report(table, args.out))

if __name__ == "__main__":
    sys.exit(main())
