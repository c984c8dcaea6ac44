"""The run configuration's schema: one dataclass per YAML section, each field with its type,
its default and, beside it, the one-line comment that becomes its row of ``docs/config.md``
(:mod:`ekd.config.reference`)."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    # Distil from the teacher's embedding less its mean direction over the training images
    # ("train_mean"), for teachers whose embeddings share one direction (a narrow cone, e.g. a
    # metric-loss teacher); "none" uses them as they are. See ekd.teachers.centering.
    center: str = "none"
    # center=train_mean with a live teacher (checkpoint, onnx): how many training images, spaced
    # evenly over the set and each also mirrored, give the mean (a cache uses all its rows).
    center_images: int = 4096


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
    # batch chance rule (no validation set needed): the training batch's genuine-vs-impostor
    # pair AUC of the student's embeddings at most 0.5 + chance_within for this many logging
    # windows in a row after warm-up; null: off
    batch_windows: int | None = 10
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
class ValSetConfig:
    """One validation set; ``val.sets`` entries are these mappings or a bare path string."""

    path: str = ""  # InsightFace .bin, pair list ("path1 path2 label"), or identity folder
    name: str | None = None  # metric prefix; default: the file or folder name without suffix
    kind: str | None = None  # "bin" | "pairs" | "folder"; default: .bin file, folder, else pair list
    root: str | None = None  # pairs: folder of the list's relative paths (default: the list's)
    color: str = "rgb"  # bin: channel order fed to the model ("rgb" | "bgr")


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
