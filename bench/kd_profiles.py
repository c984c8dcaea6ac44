"""Profiles of the KD table (schedule, scale, students, rows and seeds) and the method settings.

- ``cpu``: the v1 table (32 px, 2 epochs, one student). Kept byte-for-byte so its cell hashes,
  and so its cached cells, stay valid.
- ``cpu2``: the v2 table. Two students, MobileFaceNet and a half-width MobileFaceNet
  (``model.width: 0.5``); rows and seeds as in :func:`plan_v2`. Its input size and epochs are
  :data:`CPU2_INPUT_SIZE` / :data:`CPU2_EPOCHS` (32 px, 24 epochs), fixed by the convergence
  sweep (``bench/kd_convergence.py``).
- ``gpu``: 112 px, ArcFace, the paper's batch, T1 (IResNet-50 trained on ``train/``) and T2;
  bf16 autocast and channels_last (trainer defaults on CUDA), the key rows at one seed
  (:func:`plan_key`), run in ``--budget``-limited commands that resume.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Profile:
    """Schedule and scale of one table profile."""

    name: str
    teachers: tuple[str, ...]
    input_size: int
    epochs: int
    random_size: int
    identities_per_batch: int
    samples_per_identity: int
    head: dict
    optim: dict
    device: str
    jobs: int
    threads: int
    t1: dict = field(default_factory=dict)  # teacher T1 training (GPU profile)
    steps_per_epoch: int | None = None  # cap (smoke runs); None = whole epochs
    num_workers: int = 0  # data loader processes (not part of a cell's identity)
    plan: str = "v1"  # "v1" | "v2" | "key": which rows and seeds (plan_* below)
    students: tuple[float, ...] = (1.0,)  # MobileFaceNet widths (model.width)
    # data.preload (images decoded once into memory); a loading setting, not in the cell hash.
    # Emitted only when True and when this ekd has the key.
    preload: bool = False
    drop: tuple[str, ...] = ()  # one-seed rows left out to hold the compute budget
    # train.channels_last (student in NHWC). Not in the cell hash: it changes summation order
    # only, and is recorded in each cell's config (absent = NCHW, the trainer before it honoured
    # the key on CPU). 24-32% shorter CPU steps for MobileFaceNet at 32 px.
    channels_last: bool = True
    # train.compile (the student's training step under torch.compile). Like the layout: not in the
    # hash, recorded in each cell's config (absent = eager). 28% shorter cpu2 steps, half and full
    # width (bench/results/compile_speed_*.md).
    compile: bool = False
    # Settings chosen on the validation split (cpu3: bench/kd_tuning.py via kd_choices.tuned_settings):
    # table method -> its ``distill`` section, and "better baseline" -> "cosine" | "fitnet". Attached
    # by the table when it starts (kd_table.Table); empty for the other profiles.
    tuned: dict = field(default_factory=dict)
    # teacher.center of every KD cell (ekd.teachers.centering); left out of the tree when "none",
    # so the cpu, cpu2 and gpu hashes are unchanged.
    teacher_center: str = "none"
    # target_share of the weight-auto rows (None: ekd.engine.auto_weight.DEFAULT_TARGET_SHARE).
    auto_target_share: float | None = None


HEAD_COSFACE = {"kind": "cosface", "scale": 32.0, "margin": 0.2}
OPTIM_CPU = {"lr": 0.1, "scheduler": "cosine", "warmup_epochs": 0.3, "weight_decay": 5e-4}

# CPU: 32 px, 2 epochs of 192 steps x 128 images (64 random + 16 identities x 4), CosFace
# s=32 m=0.2 on every sample, SGD 0.1 with a 0.3-epoch warm-up and cosine decay. Chosen so
# that the 30 cells fit in about 2 hours on 2 cores; see docs/benchmark.md.
CPU = Profile(name="cpu", teachers=("T2",), input_size=32, epochs=2, random_size=64,
              identities_per_batch=16, samples_per_identity=4, head=dict(HEAD_COSFACE),
              optim=dict(OPTIM_CPU), device="cpu", jobs=2, threads=1, channels_last=False)

# Fixed by the convergence sweep (bench/kd_convergence.py, docs/results/kd_convergence.md): at
# 32 px the no-KD MobileFaceNet is not converged at 12 epochs (12 -> 24: TPR@1e-3 +11.7%, more
# than the seed spread) and is at 24 (24 -> 48: accuracy -0.004, TPR@1e-3 +3.2%). The sweep's
# 24-epoch cells are the table's no-KD cells (same hash). At ~70 min per eager NCHW full-width
# cell the 44 cells exceeded the 30 h budget and the three weakest v1 one-seed rows were dropped
# (the rule); with NHWC and compiled steps a full-width cell takes ~33 min and the whole
# table ~23 h, so every row runs again (docs/benchmark.md gives the arithmetic).
CPU2_INPUT_SIZE = 32
CPU2_EPOCHS = 24
# Dropped first (in this order, profile field `drop`) if the v2 table does not fit its budget.
WEAKEST_V1 = ("kd", "margin_distill", "fitnet")
CPU2 = Profile(name="cpu2", teachers=("T2",), input_size=CPU2_INPUT_SIZE, epochs=CPU2_EPOCHS,
               random_size=64, identities_per_batch=16, samples_per_identity=4,
               head=dict(HEAD_COSFACE), optim=dict(OPTIM_CPU), device="cpu", jobs=2, threads=1,
               plan="v2", students=(1.0, 0.5), preload=True, compile=True)

# GPU: the paper's scale (112 px, ArcFace s=64 m=0.5, batch 128 random + 128 balanced), 24
# epochs of train/ (12,316 images, ~0.3M images per run). Target: T1 + the T1 key rows in 9 min
# on one H200-class GPU. NOT MEASURED (no GPU in the sessions that wrote it); a rough estimate
# (IResNet-50 training ~2,500 img/s, a MobileFaceNet step with a frozen IResNet-50 teacher
# ~5,000 img/s, data preloaded on the GPU) gives ~2 min for T1 and ~1 min per T1 key row, so
# ~7-8 min with evaluation. The first GPU session must time one cell and, if needed, lower
# GPU_EPOCHS. T2 rows run after the T1 rows (plan_key), in further --budget commands.
GPU_EPOCHS = 24
GPU = Profile(name="gpu", teachers=("T1", "T2"), input_size=112, epochs=GPU_EPOCHS, random_size=128,
              identities_per_batch=32, samples_per_identity=4,
              head={"kind": "arcface", "scale": 64.0, "margin": 0.5},
              optim={"lr": 0.1, "scheduler": "cosine", "warmup_epochs": 1.0, "weight_decay": 5e-4},
              device="cuda", jobs=1, threads=4, num_workers=8, plan="key", preload=True,
              t1={"backbone": "iresnet50", "embedding_size": 512, "epochs": GPU_EPOCHS})
# cpu3: the cpu2 students, schedule, batches, head and protocols with teacher T3 - the same dlib
# network run on the crop as a 32-px student sees it (faces README, "A second teacher view") -
# through the embedding cache exactly as T2. Rows and seeds: plan_v3; the weights of the feature
# baselines and the "EKD (ours)" preset are chosen on the validation split (bench/kd_tuning.py).
#
# T3's embeddings lie in a narrow cone (mean unit embedding of norm 0.93 over the training faces,
# impostor cosine 0.86): matched as they are, the feature baselines spend their force on the shared
# direction, and under the margin softmax they failed the sanity gate. cpu3 therefore distils from
# T3 centred (teacher.center: train_mean, every KD cell, every method alike); the first gate, with
# T3 as stored, is kept as profile cpu3-uncentred (its cells and its weight grid).
#
# Budget (30 h of summed cell time for the tuning and the table): the first gate and its grid used
# 9.5 h, the centred grid 1.2 h; the rest of the plan at measured cell times (full width ~35 min,
# half width ~13 min) came to about 37 h in all. So, by the rule, the one-seed rows of
# methods that were really worse than no KD at TPR@1e-4 under T2 (docs/results/kd_table_cpu2_summary.md)
# are left out, never a 3-seed row; that saved about 5 h. With the EKD preset's cells measured
# (16.8 h committed when half of them were in, full-width cells 0.64 h, half-width 0.24 h), the
# 3-seed rows and gkd (the only ZOO_V2 method left, so the best one, at 3 seeds) still come to
# about 31.6 h, so the remaining one-seed rows (darkrank, sp, cckd: within noise of no KD under T2)
# were left out too. Measured with 29 of the 34 planned cells in, the tuning and the table came to
# 24.9 h and the five cells left to about 2.9 h, so two of the three are put back (darkrank,
# cckd: about 0.6 h each, to about 29 h); sp, the last one, would bring it to about 29.6 h, too
# close to 30 h when a full-width cell takes 26-37 min depending on the machine's load.
V3_DROP = ("rkd", "shrinkteanet", "triplet_distill", "coupleface", "unified_kd", "kd", "margin_distill",
           "icd_face", "EKD + AdaDistill", "sp")
CPU3 = replace(CPU2, name="cpu3", teachers=("T3",), plan="v3", teacher_center="train_mean", drop=V3_DROP)
# Its weight-auto cells ran at the provisional default target share of the time, 0.5.
CPU3_UNCENTRED = replace(CPU3, name="cpu3-uncentred", teacher_center="none", auto_target_share=0.5)
PROFILES = {p.name: p for p in (CPU, CPU2, CPU3, CPU3_UNCENTRED, GPU)}

#: Teachers known only by their stored embeddings: folder of the faces tree holding
#: ``{train,lfw,cfp}.npz`` (``paths``, ``emb``, ``emb_flip``), used through the embedding cache.
TEACHER_EMBEDDINGS = {"T2": "teacher_dlib_r29", "T3": "teacher_dlib_r29_view32"}

# EKD (ours): bias-corrected threshold EMA, thresholds from a 4096-embedding cross-batch memory,
# and the weights the authors' 8-GPU runs effectively used. Their AllGather backward multiplies
# the gathered gradient by the world size (a correction meant for their distributed softmax), so
# with 8 GPUs the EKD gradient is 8x the single-process one: pos/neg weights 0.02/0.01 act as
# 0.16/0.08. Our trainer's gradient does not depend on the world size, so these weights mean the
# same on 1 CPU and on 8 GPUs.
EKD_OURS_V1 = {"name": "ekd", "weight": 1.0,
               "params": {"bias_correction": True, "memory_size": 4096, "pos_weight": 0.16, "neg_weight": 0.08}}
# The v1 table (`cpu` profile) keeps EKD_OURS_V1, so its committed cells stay valid; the v2 and
# gpu tables use EKD_OURS, which is the preset bench/ekd_ablation.py chooses on its validation
# split (tests/test_ekd_ablation.py checks the two agree once every ablation cell is committed).
# Chosen there (28 of 28 cells, docs/results/ekd_ablation.md): "ours + one-sided", the v1 preset
# with `one_sided: true` (validation TPR@1e-4 0.0700 vs 0.0562 for the v1 preset, 2 seeds).
EKD_OURS = {**EKD_OURS_V1, "params": {**EKD_OURS_V1["params"], "one_sided": True}}
SEEDED = ("no KD", "EKD (authors)", "EKD (ours)", "AdaDistill", "EKD + AdaDistill")
OTHERS = ("fitnet", "kd", "darkrank", "sp", "cckd", "rkd", "cosine", "shrinkteanet",
          "triplet_distill", "margin_distill", "proxylesskd")
# v2 rows. Full-width student: V2_SEEDED + the best of ZOO_V2 at 3 seeds, the rest at 1 seed.
V2_SEEDED = ("no KD", "EKD (authors)", "EKD (ours)", "AdaDistill", "proxylesskd")
ZOO_V2 = ("coupleface", "gkd", "icd_face", "unified_kd")
V2_ONE_SEED = ("EKD + AdaDistill",) + tuple(m for m in OTHERS if m != "proxylesskd")
V2_HALF = ("no KD", "EKD (authors)", "EKD (ours)", "proxylesskd")  # half width, 3 seeds
KEY = ("no KD", "EKD (authors)", "EKD (ours)", "AdaDistill", "proxylesskd")  # gpu, 1 seed
# v3 rows (cpu3, teacher T3). The sanity gate runs first: the two feature baselines against no KD,
# full width, 3 seeds. Then full width V3_SEEDED + the best of ZOO_V2 at 3 seeds, every other
# distiller at 1 seed with weight auto; half width V3_HALF + the better feature baseline at 3 seeds.
V3_GATE = ("no KD", "cosine", "fitnet")
V3_SEEDED = V3_GATE + ("EKD (authors)", "EKD (ours)", "AdaDistill", "proxylesskd")
V3_TUNED = ("cosine", "fitnet", "EKD (ours)")  # chosen on the validation split (bench/kd_tuning.py)
V3_ONE_SEED = tuple(m for m in V2_ONE_SEED if m not in V3_SEEDED)
V3_AUTO = tuple(m for m in V3_ONE_SEED + ZOO_V2 if m != "EKD + AdaDistill")  # weight auto
V3_HALF = ("no KD", "EKD (authors)", "EKD (ours)")
V3_SEEDS = 3


@dataclass(frozen=True)
class Cell:
    teacher: str
    method: str
    seed: int
    width: float = 1.0  # student model.width

    @property
    def slug(self) -> str:
        m = "".join(c if c.isalnum() else "_" for c in self.method.lower()).strip("_")
        w = "" if self.width == 1.0 else f"w{self.width:g}-"
        return f"{self.teacher}-{w}{m}-s{self.seed}"


def zoo_distill(name: str) -> list[dict]:
    """The ``distill`` section of ``configs/zoo/<name>.yaml`` (the zoo's recommended settings)."""
    from ekd.config import read_yaml

    return read_yaml(REPO / "configs" / "zoo" / f"{name}.yaml")["distill"]


def auto_weighted(terms: list[dict], target_share: float | None = None) -> list[dict]:
    """``terms`` with ``weight: auto`` (ekd.engine.auto_weight; each term a 1/n share of the default
    target), unless a term replaces the margin softmax (auto measures a share of its gradient):
    then unchanged."""
    if any(t.get("params", {}).get("replace_ce") for t in terms):
        return terms
    from ekd.engine.auto_weight import DEFAULT_TARGET_SHARE

    share = (DEFAULT_TARGET_SHARE if target_share is None else target_share) / len(terms)
    return [{**t, "weight": "auto", "target_share": share} for t in terms]


def method_distill(method: str, teacher: str = "T2", plan: str = "v2", tuned: dict | None = None,
                   auto_share: float | None = None) -> list[dict]:
    """A row's ``distill`` section; ``plan`` v1 keeps the v1 "EKD (ours)" (see EKD_OURS); ``plan``
    v3 takes the feature baselines and "EKD (ours)" from ``tuned`` (chosen on the validation
    split) and gives the one-seed rows ``weight: auto`` (:data:`V3_AUTO`)."""
    if plan == "v3" and method in V3_TUNED:
        if not tuned or method not in tuned:
            raise KeyError(f"{method}: not chosen on the validation split yet (bench/kd_tuning.py)")
        return [dict(t) for t in tuned[method]]
    if plan == "v3" and method in V3_AUTO:
        return auto_weighted(method_distill(method, teacher, "v2"), auto_share)
    ours = EKD_OURS_V1 if plan == "v1" else EKD_OURS
    if method == "no KD":
        return []
    if method == "EKD (authors)":
        return [{"name": "ekd", "weight": 1.0, "params": {}}]
    if method == "EKD (ours)":
        return [ours]
    if method == "AdaDistill":
        return zoo_distill("adadistill")
    if method == "EKD + AdaDistill":
        return [ours] + zoo_distill("adadistill")
    terms = zoo_distill(method)
    if method == "gkd" and teacher in TEACHER_EMBEDDINGS:  # an embedding cache has no classifier
        terms = [{**t, "params": {**t["params"], "logits": "teacher_centers"}} for t in terms]
    return terms


Result = Callable[[Cell], "dict | None"]


def best_of(methods: tuple[str, ...], teacher: str, result: Result, n: int, width: float = 1.0) -> list[str] | None:
    """The ``n`` best of ``methods`` at seed 0 (LFW all-pairs TPR@1e-4, then LFW accuracy);
    None until all of them have a result (so pass only methods the plan runs)."""
    scores = {}
    for m in methods:
        r = result(Cell(teacher, m, 0, width))
        if r is None:
            return None
        scores[m] = (r["metrics"]["lfw_tpr@1e-4"] or 0.0, r["metrics"]["lfw_acc"])
    return sorted(methods, key=lambda m: scores[m], reverse=True)[:n]


def plan_v1(profile: Profile, result: Result) -> list[Cell]:
    """v1: SEEDED at 3 seeds, OTHERS at 1, then the two best OTHERS at seeds 1-2."""
    cells = []
    for t in profile.teachers:
        cells += [Cell(t, m, s) for s in range(3) for m in SEEDED]
        cells += [Cell(t, m, 0) for m in OTHERS]
        best = best_of(OTHERS, t, result, 2)
        if best:
            cells += [Cell(t, m, s) for m in best for s in (1, 2)]
    return sorted(cells, key=lambda c: (c.seed > 0 and c.method in OTHERS, c.seed, c.teacher))


def plan_v2(profile: Profile, result: Result) -> list[Cell]:
    """v2: full width V2_SEEDED at 3 seeds, V2_ONE_SEED and ZOO_V2 at 1 (minus ``drop``), then the
    best ZOO_V2 method at seeds 1-2; half width (if a student) V2_HALF at 3 seeds."""
    cells = []
    for t in profile.teachers:
        cells += [Cell(t, m, s) for s in range(3) for m in V2_SEEDED]
        if 0.5 in profile.students:
            cells += [Cell(t, m, s, 0.5) for s in range(3) for m in V2_HALF]
        cells += [Cell(t, m, 0) for m in V2_ONE_SEED + ZOO_V2 if m not in profile.drop]
        best = best_of(tuple(m for m in ZOO_V2 if m not in profile.drop), t, result, 1)
        if best:
            cells += [Cell(t, best[0], s) for s in (1, 2)]
    # the 3-seed rows first (their intervals carry the table's claims), then the one-seed rows
    return sorted(cells, key=lambda c: (c.method in ZOO_V2 and c.seed > 0, c.method not in V2_SEEDED,
                                        c.seed, c.width != 1.0))


def plan_key(profile: Profile, result: Result) -> list[Cell]:  # noqa: ARG001
    """gpu: the KEY rows at seed 0 for every teacher (T1 first)."""
    return [Cell(t, m, 0) for t in profile.teachers for m in KEY]


def gate_verdict(profile: Profile, result: Result) -> tuple[bool | None, list[str]]:
    """The cpu3 sanity gate: does cosine or FitNet (full width, 3 seeds) beat no KD *really* at
    both LFW accuracy and TPR@1e-3 - its seed-mean difference larger than the larger max - min
    spread over seeds of the two rows, on each metric? ``(None, why)`` until every gate cell has
    a result; ``(passed, reasons)`` after."""
    t = profile.teachers[0]
    rows = {m: [result(Cell(t, m, s)) for s in range(V3_SEEDS)] for m in V3_GATE if m == "no KD" or m in profile.tuned}
    if len(rows) < len(V3_GATE) or any(r is None for rs in rows.values() for r in rs):
        return None, ["the gate's cells are not all in"]
    base, reasons, passed = rows["no KD"], [], False
    for m in V3_GATE[1:]:
        ahead = True
        for key in ("lfw_acc", "lfw_tpr@1e-3"):
            b = [r["metrics"][key] or 0.0 for r in base]
            v = [r["metrics"][key] or 0.0 for r in rows[m]]
            diff = sum(v) / len(v) - sum(b) / len(b)
            spread = max(max(v) - min(v), max(b) - min(b))
            ahead &= diff > spread
            reasons.append(f"{m} vs no KD, {key}: {diff:+.4f} (seed spread {spread:.4f})")
        passed |= ahead
    return passed, reasons


def plan_v3(profile: Profile, result: Result) -> list[Cell]:
    """v3 (cpu3): the sanity gate (:func:`gate_verdict`) first and alone; once it has passed, the
    3-seed rows at both widths, the one-seed rows and the best ZOO_V2 method's seeds 1-2. A gate
    that fails stops the plan there (the report says why)."""
    t, tuned = profile.teachers[0], profile.tuned
    gate = [Cell(t, m, s) for s in range(V3_SEEDS) for m in V3_GATE if m == "no KD" or m in tuned]
    passed, _ = gate_verdict(profile, result)
    if not passed:
        return gate
    seeded = [m for m in V3_SEEDED if m not in V3_TUNED or m in tuned]
    cells = gate + [Cell(t, m, s) for s in range(V3_SEEDS) for m in seeded if m not in V3_GATE]
    if 0.5 in profile.students:
        half = [m for m in V3_HALF if m not in V3_TUNED or m in tuned]
        half += [tuned["better baseline"]] if "better baseline" in tuned else []
        cells += [Cell(t, m, s, 0.5) for s in range(V3_SEEDS) for m in half]
    cells += [Cell(t, m, 0) for m in V3_ONE_SEED + ZOO_V2 if m not in profile.drop]
    best = best_of(tuple(m for m in ZOO_V2 if m not in profile.drop), t, result, 1)  # of those planned
    if best:
        cells += [Cell(t, best[0], s) for s in (1, 2)]
    return sorted(cells, key=lambda c: (c.method not in V3_GATE or c.width != 1.0, c.method in ZOO_V2 and c.seed > 0,
                                        c.method not in V3_SEEDED + V3_HALF, c.seed, c.width != 1.0))


def plan_stage(profile: Profile, result: Result) -> list[str]:
    """What a v3 plan still waits for before its later cells are known (empty when nothing, and
    for the other plans): the settings not yet chosen on the validation split, the sanity gate."""
    if profile.plan != "v3":
        return []
    waiting = [m for m in (*V3_TUNED, "better baseline") if m not in profile.tuned]
    lines = []
    if waiting:
        lines.append("not chosen on the validation split yet (`bench/kd_tuning.py`, "
                     f"docs/results/kd_tuning_cpu3.md): {', '.join(waiting)}")
    passed, reasons = gate_verdict(profile, result)
    if passed is None:
        lines.append("sanity gate (no KD, cosine, FitNet; full width, 3 seeds): waiting for its cells; "
                     "the rest of the table is planned once it has passed")
    elif not passed:
        lines.append("**sanity gate failed**: neither feature baseline beats no KD at LFW accuracy and "
                     "TPR@1e-3 by more than the seed spread; the plan stops here (" + "; ".join(reasons) + ")")
    elif waiting:
        lines.append("sanity gate passed (" + "; ".join(reasons) + ")")
    return lines


def gate_statement(profile: Profile, result: Result) -> str:
    """The report's line on the v3 sanity gate (:func:`gate_verdict`), with its numbers; empty for
    the other plans."""
    if profile.plan != "v3":
        return ""
    passed, reasons = gate_verdict(profile, result)
    word = {None: "waiting for its cells", True: "**passed**", False: "**failed**"}[passed]
    return (f"Sanity gate (no KD, cosine and FitNet at full width, 3 seeds; a baseline passes when its seed-mean "
            f"lead over no KD at LFW accuracy and at TPR@1e-3 is larger than the seed spread): {word}"
            + (" (" + "; ".join(reasons) + ")." if passed is not None else "."))


PLANS = {"v1": plan_v1, "v2": plan_v2, "key": plan_key, "v3": plan_v3}
