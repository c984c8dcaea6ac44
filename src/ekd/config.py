"""Typed run configuration: dataclasses loaded from YAML with ``--set a.b=c`` overrides.

Every section is a dataclass; loading is strict: an unknown key or a value of the wrong type is a
:class:`~ekd.errors.ConfigError` that names the key and lists the valid ones. Impossible values
(negative sizes, a balanced part larger than the dataset allows, ...) are rejected by
:func:`validate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ekd.config_types import ValSetConfig, _valid_keys, from_dict, to_dict  # noqa: F401  (re-exported)
from ekd.errors import ConfigError


@dataclass
class SyntheticConfig:
    """The built-in procedural face dataset (see :mod:`ekd.data.synthetic_faces`)."""

    train_identities: int = 200  # identities of the training folder
    train_images: int = 16  # images per training identity
    eval_identities: int = 60  # evaluation identities, disjoint from the training ones
    eval_images: int = 10  # images per evaluation identity
    num_pairs: int = 2000  # pairs in the evaluation pair list (half genuine)
    image_size: int = 56  # side of the rendered faces, pixels
    seed: int = 0  # the faces drawn (the same seed renders the same faces)
    cache_dir: str = "outputs/synthetic"  # folder the generated images are kept in and reused from


@dataclass
class DataConfig:
    """Training data of kind ``kind`` (:mod:`ekd.data.kinds`): an identity folder
    (``root/<identity>/<image>``), an InsightFace ``.rec`` (``root`` = the file, its prefix or
    a folder holding ``train.rec``) or the synthetic set."""

    kind: str = "synthetic"  # what root holds: "folder" | "rec" | "synthetic" (built-in faces)
    root: str | None = None  # identity folder, or .rec file / prefix / folder holding train.rec
    input_size: int = 112  # side of the square aligned crops fed to the models (resized to it)
    num_workers: int = 0  # DataLoader worker processes (0: load in the training process)
    # An unreadable image: "skip" (replaced by a readable one, counted, warned) or "error".
    on_corrupt: str = "skip"
    # A .rec cut short (a record or index offset past its end) is an error; true trains on the
    # readable part, and the run's start and end say how many images and identities it lost.
    accept_truncated: bool = False
    # Decode every image once into one uint8 tensor on the training device and build batches
    # there (no DataLoader); refused when N*3*S*S bytes exceed preload_max_gb (10**9 bytes).
    preload: bool = False
    preload_max_gb: float = 4.0  # largest preloaded set, in 10**9 bytes (see preload)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class SamplerConfig:
    """Each batch = ``random_size`` random samples + P identities x K samples (EKD, Sec. 3.3)."""

    random_size: int = 64  # samples drawn at random (the margin softmax's part of the batch)
    identities_per_batch: int = 16  # P: identities of the balanced part (positive pairs for EKD)
    samples_per_identity: int = 4  # K: samples of each of those identities


@dataclass
class ModelConfig:
    """The student network (or the teacher, when training one)."""

    backbone: str = "mobilefacenet"  # architecture: mobilefacenet, mbf, iresnet18/34/50/100
    embedding_size: int = 512  # dimension of the face embedding
    dropout: float = 0.0  # dropout probability before the embedding layer
    # Channel multiplier of the MobileFaceNet family (0.5: half-width student); 1.0 otherwise.
    width: float = 1.0


@dataclass
class HeadConfig:
    """The margin softmax on top of the embedding."""

    kind: str = "arcface"  # margin of the softmax: "arcface" (angular) | "cosface" (cosine)
    scale: float = 64.0  # s: the cosine logits' scale
    margin: float = 0.5  # m: the margin (ArcFace 0.5 rad, CosFace 0.35 typical)
    # Partial FC: fraction of negative class centres sampled per step (1.0 = full softmax);
    # below 1.0, or with several processes, the centres are sharded across ranks.
    sample_rate: float = 1.0


@dataclass
class TeacherConfig:
    """Where the frozen teacher comes from. ``kind: none`` trains without a teacher."""

    kind: str = "none"  # "none" | "checkpoint" | "onnx" | "cache"
    # checkpoint: an ekd checkpoint or arcface_torch backbone.pth; onnx: a .onnx model;
    # cache: a folder written by `ekd teacher-cache`.
    path: str | None = None
    # Architecture, needed for checkpoints that do not store it (arcface_torch backbone.pth).
    backbone: str | None = None
    embedding_size: int | None = None  # embedding size of such a checkpoint (null: read from it)
    # ONNX teachers: what the model expects from an aligned RGB face with pixels in [0, 255].
    onnx_color: str = "RGB"  # "RGB" | "BGR"
    onnx_layout: str = "NCHW"  # "NCHW" | "NHWC"
    onnx_mean: float = 127.5  # ONNX teachers: input = (pixel - onnx_mean) / onnx_std
    onnx_std: float = 127.5  # ONNX teachers: see onnx_mean
    # cache: the teacher file the cache must have been made from (checked when given).
    cache_teacher: str | None = None
    # Class centres for distillers that need the teacher's classifier: the checkpoint's margin
    # head ("classifier"), or the normalised mean cached embedding of each training identity
    # ("mean_embedding", for embedding-only teachers read from a cache).
    centers: str = "classifier"


@dataclass
class DistillerConfig:
    """One distiller of the registry, its overall weight and its own parameters."""

    name: str = "ekd"  # a registered distiller (docs/methods.md): ekd, kd, rkd, gkd, ...
    # multiplies the distiller's loss in the total loss; "auto": the weight that gives its terms
    # target_share of the margin softmax's gradient into the embedding, measured over the first
    # train.auto_weight_steps steps, then fixed and logged (docs/methods.md, ekd.engine.auto_weight)
    weight: float | str = 1.0
    params: dict = field(default_factory=dict)  # the distiller's own options (docs/methods.md)
    # with weight "auto": the target share (null = ekd.engine.auto_weight.DEFAULT_TARGET_SHARE)
    target_share: float | None = None


@dataclass
class OptimConfig:
    """SGD with momentum and a learning-rate schedule over the steps of the run."""

    lr: float = 0.1  # peak learning rate
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # L2 weight decay
    scheduler: str = "cosine"  # "cosine" | "step"
    warmup_epochs: float = 0.0  # linear warm-up from 0 to lr over this many epochs
    milestones: list = field(default_factory=list)  # epochs, for the step scheduler
    gamma: float = 0.1  # step scheduler: lr factor at each milestone
    # Clip the L2 norm of all gradients to this value (null = off; AdaDistill's recipe: 5).
    clip_grad_norm: float | None = None


@dataclass
class GuardConfig:
    """Divergence guard (:mod:`ekd.engine.guard`): stop a diverged or collapsed run, keep the
    last good checkpoint. A rule is off when its setting is null."""

    enabled: bool = True  # false switches every rule off
    # loss rule: the logged loss above loss_factor x its running minimum for loss_windows
    # logging windows (train.log_every steps each) in a row, after warm-up
    loss_factor: float | None = 1.2
    loss_windows: int = 10  # logging windows in a row above the limit before the loss rule stops
    # chance rule: a validation set's acc or auc at most 0.5 + chance_within after warm-up
    chance_within: float | None = 0.05
    # neither rule fires up to this many epochs (a short run may end near chance)
    warmup_epochs: float = 2.0


@dataclass
class TrainConfig:
    """The training run: length, device, where it writes, logging, checkpoints."""

    epochs: int = 10  # passes over the training set
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    seed: int = 0  # seeds weights, sampling and augmentation (a run is reproducible)
    output_dir: str = "runs/default"  # run folder: config, metrics.jsonl, checkpoints, model.pt
    # The margin cross-entropy sees the random part of the batch ("random", the authors' split)
    # or the whole batch ("all").
    ce_on: str = "random"
    log_every: int = 10  # steps between rows of metrics.jsonl
    progress: bool = True  # a progress bar per epoch (off: a log line every 30 s instead)
    max_steps_per_epoch: int | None = None  # cut each epoch short (smoke runs); null: whole epoch
    # Mixed precision on GPU ("bf16" or "fp16" with a grad scaler); ignored on CPU.
    amp: str = "none"  # "none" | "bf16" | "fp16"
    # Student weights and input batches in NHWC (channels_last) memory format, on CPU and GPU:
    # 24-32% shorter MobileFaceNet steps at 32 px on CPU (docs/benchmark.md), Tensor Cores on GPU.
    channels_last: bool = True
    # Compile the student's training forward and backward with torch.compile (inductor); the
    # first step compiles (about a minute on CPU, where a C++ compiler is needed). On CPU at 32 px
    # a MobileFaceNet EKD step is ~28% shorter (docs/scale.md). Evaluation runs the plain module.
    compile: bool = False
    # A non-finite loss or gradient skips the step; this many in a row stop the run.
    max_bad_steps: int = 5
    # Resume from a checkpoint ("auto" = output_dir/checkpoints/last.pt when it exists).
    resume: str | None = None
    # Start again in an output_dir that holds another run, deleting that run's files first
    # (`ekd train --overwrite`); without it (or train.resume) such a folder is refused.
    overwrite: bool = False
    # Divergence guard: non-finite loss, a loss far above its minimum, validation at chance.
    guard: GuardConfig = field(default_factory=GuardConfig)
    # Scalars under output_dir/tensorboard/ (null = when the tensorboard package is installed).
    tensorboard: bool | None = None
    # Per-term gradient shares and distiller internals on logged steps (ekd.engine.diagnostics).
    diagnostics: bool = True
    # Steps over which a distiller with weight "auto" measures its gradient share before its
    # weight is fixed (its terms are computed, not applied, until then).
    auto_weight_steps: int = 20


@dataclass
class EvalConfig:
    """Verification sets evaluated after training (a generic pair list and/or all pairs)."""

    pairs: str | None = None  # "path1 path2 label" list
    pairs_root: str | None = None  # folder the pair list's relative paths start from
    folder: str | None = None  # all pairs over an identity folder
    max_per_identity: int | None = 10  # folder: first N images of each identity
    batch_size: int = 128  # images embedded at once


@dataclass
class ValConfig:
    """Verification during training (docs/training.md): every ``every_steps`` steps and at every
    epoch end; metrics ``<set>/<acc|auc|tpr@F>``; ``keep_best`` names one of them for best.pt."""

    sets: list = field(default_factory=list)  # paths or ValSetConfig mappings
    every_steps: int | None = None  # also validate every N steps (null: at epoch ends only)
    keep_best: str | None = None  # e.g. "lfw/tpr@1e-4", "cfp_fp/acc"
    fprs: list[float] = field(default_factory=lambda: [1e-3, 1e-4])  # FPRs of the tpr@F metrics
    batch_size: int = 128  # images embedded at once
    max_per_identity: int | None = 10  # folder sets: first N images of each identity
    # Images whose size differs from data.input_size: an error, or resized bilinearly (true).
    resize: bool = False


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: list[DistillerConfig] = field(default_factory=list)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    val: ValConfig = field(default_factory=ValConfig)


_CHOICES = {
    "data.kind": ("folder", "rec", "synthetic"),  # = ekd.data.kinds.DATASET_KINDS (tested)
    "data.on_corrupt": ("skip", "error"),
    "head.kind": ("arcface", "cosface"),
    "teacher.kind": ("none", "checkpoint", "onnx", "cache"),
    "teacher.centers": ("classifier", "mean_embedding"),
    "teacher.onnx_color": ("RGB", "BGR"),
    "teacher.onnx_layout": ("NCHW", "NHWC"),
    "train.amp": ("none", "bf16", "fp16"),
    "optim.scheduler": ("cosine", "step"),
    "train.ce_on": ("random", "all"),
}


# --------------------------------------------------------------------------- loading


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.c`` (list items by index: ``distill.0.weight``) in a nested mapping."""
    parts = dotted.split(".")
    node: Any = tree
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[:depth + 1])
        if isinstance(node, list):
            index = int(part) if part.isdecimal() and len(part) < 10 else len(node)
            if not node:
                raise ConfigError(f"--set {dotted}: the list {'.'.join(parts[:depth])} is empty; "
                                  "add its entries in the YAML file (or --set "
                                  f"{'.'.join(parts[:depth])}=[...])")
            if index >= len(node):
                raise ConfigError(f"--set {dotted}: {where} is not an index of a list of {len(node)}")
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {'.'.join(parts[:depth])} is not a section")
        if last:
            node[part] = value
        elif node.get(part) is None and parts[depth + 1].isdecimal():
            raise ConfigError(f"--set {dotted}: the list {where} is empty; add its entries in the "
                              f"YAML file (or --set {where}=[...])")
        else:
            node = node.setdefault(part, {})


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse ``a.b=c`` strings; values are read as YAML scalars (``1e-4``, ``true``, ``[1,2]``)."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        value = _safe_yaml(raw, f"--set {key}: cannot parse value {raw!r}") if raw.strip() else ""
        out.append((key.strip(), value))
    return out


def _safe_yaml(text: str, what: str) -> Any:
    """``yaml.safe_load`` (plain data only: a ``!!python/...`` tag is an error, never code run);
    every failure, including PyYAML's ValueErrors on impossible dates, is a ConfigError."""
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise ConfigError(f"{what}: {type(exc).__name__}: {exc}") from None


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping safely; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc}") from None
    data = _safe_yaml(text, f"{path}: invalid YAML")
    if data is None:
        raise ConfigError(f"{path}: the file is empty (no settings); start from a file in "
                          "configs/, e.g. configs/ekd_synthetic.yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections ({_valid_keys(Config)})")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> Config:
    """Load a :class:`Config` from YAML (optional) plus ``--set`` overrides, then validate."""
    tree: dict = dict(base or {})
    if path is not None:
        tree.update(read_yaml(path))
    for key, value in parse_overrides(overrides or []):
        _set_path(tree, key, value)
    cfg = from_dict(Config, tree)
    if path is not None and "data" not in tree:
        raise ConfigError(f"{path}: no 'data' section, so nothing says what to train on; add "
                          "data: {kind: synthetic} (ekd's synthetic faces) or data: {kind: folder, "
                          "root: FOLDER, input_size: 112}")
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def validate(cfg: Config) -> None:
    """Reject impossible values with errors that name the key and the valid choices."""
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")
    positive = {
        "data.input_size": cfg.data.input_size,
        "model.embedding_size": cfg.model.embedding_size,
        "sampler.samples_per_identity": cfg.sampler.samples_per_identity,
        "train.epochs": cfg.train.epochs,
        "eval.batch_size": cfg.eval.batch_size,
        "val.batch_size": cfg.val.batch_size,
        "train.log_every": cfg.train.log_every,
        "data.preload_max_gb": cfg.data.preload_max_gb,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    nonneg = {
        "sampler.random_size": cfg.sampler.random_size,
        "sampler.identities_per_batch": cfg.sampler.identities_per_batch,
        "data.num_workers": cfg.data.num_workers,
        "optim.weight_decay": cfg.optim.weight_decay,
        "optim.warmup_epochs": cfg.optim.warmup_epochs,
    }
    for key, value in nonneg.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {cfg.optim.lr}")
    if cfg.sampler.random_size + cfg.sampler.identities_per_batch == 0:
        raise ConfigError("sampler: the batch is empty (random_size and identities_per_batch are both 0)")
    if cfg.train.ce_on == "random" and cfg.sampler.random_size == 0:
        raise ConfigError("train.ce_on is 'random' but sampler.random_size is 0: "
                          "set train.ce_on=all or a positive random_size")
    if cfg.data.kind in ("folder", "rec") and not cfg.data.root:
        raise ConfigError(f"data.root is required when data.kind is '{cfg.data.kind}'")
    if cfg.teacher.kind != "none" and not cfg.teacher.path:
        raise ConfigError(f"teacher.path is required when teacher.kind is '{cfg.teacher.kind}'")
    if not 0 < cfg.head.sample_rate <= 1:
        raise ConfigError(f"head.sample_rate must be in (0, 1], got {cfg.head.sample_rate}")
    if cfg.train.max_bad_steps < 1:
        raise ConfigError(f"train.max_bad_steps must be >= 1, got {cfg.train.max_bad_steps}")
    guard = cfg.train.guard
    if guard.loss_factor is not None and guard.loss_factor <= 1:
        raise ConfigError(f"train.guard.loss_factor must be > 1 (or null: rule off), got {guard.loss_factor}")
    if guard.loss_windows < 1:
        raise ConfigError(f"train.guard.loss_windows must be >= 1, got {guard.loss_windows}")
    if guard.chance_within is not None and not 0 <= guard.chance_within < 0.5:
        raise ConfigError(f"train.guard.chance_within must be in [0, 0.5) (or null: rule off), "
                          f"got {guard.chance_within}")
    if guard.warmup_epochs < 0:
        raise ConfigError(f"train.guard.warmup_epochs must be >= 0, got {guard.warmup_epochs}")
    if cfg.teacher.onnx_std <= 0:
        raise ConfigError(f"teacher.onnx_std must be > 0, got {cfg.teacher.onnx_std}")
    if cfg.distill and cfg.teacher.kind == "none":
        names = ", ".join(d.name for d in cfg.distill)
        raise ConfigError(f"distill lists {names} but teacher.kind is 'none': "
                          "a distiller needs a teacher (set teacher.kind and teacher.path)")
    for i, d in enumerate(cfg.distill):
        if isinstance(d.weight, str):
            if d.weight != "auto":
                raise ConfigError(f"distill[{i}].weight must be a number or 'auto', got {d.weight!r}")
            if d.target_share is not None and not (math.isfinite(d.target_share) and d.target_share > 0):
                raise ConfigError(f"distill[{i}].target_share must be a number > 0, got {d.target_share}")
        else:
            if d.weight < 0:
                raise ConfigError(f"distill[{i}].weight must be >= 0, got {d.weight}")
            if d.target_share is not None:
                raise ConfigError(f"distill[{i}].target_share is used with weight: auto only "
                                  f"(weight is {d.weight:g})")
    if cfg.train.auto_weight_steps < 1:
        raise ConfigError(f"train.auto_weight_steps must be >= 1, got {cfg.train.auto_weight_steps}")
    from ekd.config_checks import check_more  # needs the model/distiller registries

    check_more(cfg)
