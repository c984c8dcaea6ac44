"""Cost of every distiller (loss + backward) against a MobileFaceNet training step, on this machine.

For each registered distiller and global batch N in (128, 512, 2048), with d = 512 embeddings:
time ``loss = sum(distiller(student, teacher, labels, **extras)); loss.backward()`` with the
student embeddings a leaf that requires grad. The extras a method requires are built inside the
timed region as the trainer builds them (student logits through a margin head, teacher logits
from the teacher's centres, C classes). The batch is EKD's: N/2 random samples followed by
(N/2)/4 identities x 4 samples.

The student step is a MobileFaceNet (``build_backbone("mobilefacenet", 512, 112)``) forward,
ArcFace cross-entropy over C classes, backward and SGD step. At 112 px a batch of 512 is too slow
for this CPU, so it is measured at batch 64 / 112 px and scaled linearly to 512 (the step is
linear in the batch), and also measured directly at batch 512 / 56 px. The EKD ratio is
``EKD(N=512) / student step(512)`` for both.

Timings: median of up to ``--repeats`` runs after one warm-up; runs slower than 2 s are repeated
3 times, slower than 20 s once. Torch threads: the default unless ``--threads``. Writes
``bench/results/<name>.{md,json}`` (default name ``distill_cost``).

    python -m bench.distill_cost [--batches 128 512 2048] [--classes 10000] [--repeats 5]
                                 [--threads N] [--name distill_cost]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ekd.distill import DISTILLERS, build_distiller, distiller_params
from ekd.heads import ArcFace
from ekd.models import build_backbone

DIM = 512
OUT = Path(__file__).resolve().parent / "results"


def ekd_batch(n: int, classes: int, gen: torch.Generator) -> torch.Tensor:
    """Labels of an EKD batch: n/2 random, then identities x 4 samples."""
    rand = torch.randint(0, classes, (n // 2,), generator=gen)
    ids = torch.randperm(classes, generator=gen)[: (n - n // 2) // 4]
    bal = ids.repeat_interleave(4)
    labels = torch.cat([rand, bal])
    if len(labels) < n:  # n not a multiple of 8
        labels = torch.cat([labels, rand[: n - len(labels)]])
    return labels


def timed(fn, repeats: int) -> tuple[float, int]:
    """Median seconds of ``fn`` after one warm-up, and the number of timed runs."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    runs = 1 if first > 20 else (3 if first > 2 else repeats)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), runs


def distiller_step(name: str, n: int, classes: int, gen: torch.Generator):
    """A closure running one loss + backward of distiller ``name`` at batch ``n``."""
    auto = {"num_classes": classes, "student_dim": DIM, "teacher_dim": DIM}
    accepted = distiller_params(name)
    distiller = build_distiller(name, **{k: v for k, v in auto.items() if k in accepted})
    labels = ekd_batch(n, classes, gen)
    student = torch.randn(n, DIM, generator=gen)
    teacher = student + 0.5 * torch.randn(n, DIM, generator=gen)
    head = ArcFace(DIM, classes, scale=64.0, margin=0.5)
    centres = torch.randn(classes, DIM, generator=gen)
    req = DISTILLERS[name].requires

    def run() -> None:
        emb = student.clone().requires_grad_(True)
        extras: dict[str, object] = {}
        if "student_logits" in req:
            extras["student_logits"] = head.cosine(emb) * head.scale
        if "teacher_logits" in req:
            with torch.no_grad():
                extras["teacher_logits"] = F.linear(F.normalize(teacher), F.normalize(centres)) * 64.0
        if "teacher_centers" in req:
            extras["teacher_centers"] = centres
        if "student_head" in req:
            extras["student_head"] = head
        if "random_size" in req:
            extras["random_size"] = n // 2
        loss = sum(distiller(emb, teacher, labels, **extras).values())
        loss.backward()

    return run


def student_step(batch: int, size: int, classes: int, gen: torch.Generator):
    """A closure running one MobileFaceNet + ArcFace training step."""
    model = build_backbone("mobilefacenet", DIM, size)
    head = ArcFace(DIM, classes, scale=64.0, margin=0.5)
    opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.01, momentum=0.9)
    images = torch.randn(batch, 3, size, size, generator=gen)
    labels = torch.randint(0, classes, (batch,), generator=gen)

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(head(model(images), labels), labels)
        loss.backward()
        opt.step()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--classes", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=sorted(DISTILLERS))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's default)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--name", default="distill_cost", help="output file stem")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "load_avg_start": os.getloadavg(), "dim": DIM, "classes": args.classes,
            "repeats": args.repeats}
    print(f"torch {info['torch']}, {info['threads']} threads, load {info['load_avg_start']}")

    results: dict[str, dict[str, dict]] = {}
    for name in args.methods:
        results[name] = {}
        for n in args.batches:
            sec, runs = timed(distiller_step(name, n, args.classes, gen), args.repeats)
            results[name][str(n)] = {"seconds": sec, "runs": runs}
            print(f"{name:16s} N={n:5d}  {sec * 1e3:10.1f} ms  ({runs} runs)", flush=True)

    step64, r64 = timed(student_step(64, 112, args.classes, gen), 3)
    step512s, r512 = timed(student_step(512, 56, args.classes, gen), 3)
    student = {"b64_112px": {"seconds": step64, "runs": r64},
               "b512_112px_scaled": {"seconds": step64 * 512 / 64, "note": "batch 64 x 8 (linear)"},
               "b512_56px": {"seconds": step512s, "runs": r512}}
    print(f"MobileFaceNet step: b64@112px {step64:.2f} s -> b512@112px {step64 * 8:.2f} s (scaled); "
          f"b512@56px {step512s:.2f} s")
    ratios = {}
    if "ekd" in results and "512" in results["ekd"]:
        e = results["ekd"]["512"]["seconds"]
        ratios = {"ekd_vs_step_112px_scaled": e / (step64 * 8), "ekd_vs_step_56px": e / step512s}
        print(f"EKD / student step at batch 512: {100 * ratios['ekd_vs_step_112px_scaled']:.2f}% "
              f"(112 px, scaled), {100 * ratios['ekd_vs_step_56px']:.2f}% (56 px, measured)")
    info["load_avg_end"] = os.getloadavg()
    report = {"info": info, "distillers": results, "student_step": student, "ekd_ratio": ratios}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    (args.out / f"{args.name}.md").write_text(markdown(report, args.batches))
    print(f"wrote {args.out / args.name}.md and .json")


def _cell(entry: dict, repeats: int) -> str:
    text = f"{entry['seconds'] * 1e3:.1f} ms"
    return text if entry["runs"] >= repeats else text + f" ({entry['runs']} run{'s' * (entry['runs'] > 1)})"


def markdown(report: dict, batches: list[int]) -> str:
    info, st = report["info"], report["student_step"]
    lines = [f"# Distiller cost (loss + backward), d = {info['dim']}, C = {info['classes']}",
             "",
             f"torch {info['torch']}, {info['threads']} threads, {info['cores']} cores ({info['cpu']}); "
             f"load average {info['load_avg_start'][0]:.1f} at start, {info['load_avg_end'][0]:.1f} at end "
             "(the machine is shared: timings are noisy).",
             "",
             f"Median of {info['repeats']} runs after a warm-up unless the number of runs is given.",
             "",
             "| method | " + " | ".join(f"N = {n}" for n in batches) + " |",
             "|---|" + "---:|" * len(batches)]
    for name, row in report["distillers"].items():
        cells = [_cell(row[str(n)], info["repeats"]) for n in batches if str(n) in row]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "MobileFaceNet training step (forward, ArcFace CE, backward, SGD):", "",
              f"- batch 64 at 112 px: {st['b64_112px']['seconds']:.2f} s measured -> batch 512 at "
              f"112 px: {st['b512_112px_scaled']['seconds']:.2f} s (scaled linearly, not measured)",
              f"- batch 512 at 56 px: {st['b512_56px']['seconds']:.2f} s measured"]
    if report["ekd_ratio"]:
        r = report["ekd_ratio"]
        lines += ["", f"EKD at N = 512 / student step at batch 512: "
                  f"**{100 * r['ekd_vs_step_112px_scaled']:.2f}%** (112 px, scaled) and "
                  f"{100 * r['ekd_vs_step_56px']:.2f}% (56 px, measured); target < 3%."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
