"""Does distillation beat plain training at equal steps, and which method? Measured on the embedded benchmark.

    python3 -m bench.quality            # 3 seeds x 6 methods, 150 steps each: about 35 minutes on 2 CPU cores
    python3 -m bench.quality --quick    # 1 seed, 40 steps, the first 1000 samples: under 5 minutes

Every run is `distill.py --config configs/tiny.yaml` (the 4-layer teacher and 2-layer student of the offline
demo) with the same seed, data, batches and number of optimizer steps, changing one thing:
- plain: next-token training alone (loss.ClassicLoss), no teacher;
- forward_kl: the default distillation loss (alpha KL(teacher || student) + beta CE);
- reverse_kl, jsd: the same with `divergence: reverse_kl` or `jsd` (jsd_beta 0.5);
- teacher_layers: forward_kl, with the student initialised from evenly spaced teacher blocks (`student.init:
  uniform`) instead of random weights;
- cached_top_k: forward_kl against the teacher's top-k distributions cached on disk (`teacher.cache_top_k`); the
  first seed builds the cache, the later seeds (and later runs) only read it.
It prints the validation perplexity of each method (mean and spread over the seeds) beside the teacher's, the
training throughput, the cache's build time and per-epoch speed-up, and as its last line one JSON object with each
method's mean validation perplexity.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import distill

REPO = Path(__file__).resolve().parent.parent
CACHE_TOP_K = 16
METHODS = {
    "plain": ["training_parameters.loss={'()': loss.ClassicLoss}"],
    "forward_kl": [],
    "reverse_kl": ["training_parameters.loss.divergence=reverse_kl"],
    "jsd": ["training_parameters.loss.divergence=jsd"],
    "teacher_layers": ["student.init=uniform"],
    "cached_top_k": [f"teacher.cache_top_k={CACHE_TOP_K}"],
}


def run_method(method: str, seed: int, steps: int, checkpoints: Path, max_samples: int | None) -> dict:
    name = f"{method}-seed{seed}"
    overrides = [
        f"seed={seed}",
        f"data.max_samples={'null' if max_samples is None else max_samples}",
        f"paths.checkpoints={checkpoints}",
        f"training_parameters.max_steps={steps}",
        "training_parameters.eval_every_steps=null",  # one validation, at the end
        f"training_parameters.log_every_steps={max(1, min(10, steps // 4))}",  # a few throughput records
        "training_parameters.checkpoint_every_steps=null",
        "training_parameters.report_to=none",
        *METHODS[method],
    ]
    arguments = ["--config", str(REPO / "configs" / "tiny.yaml"), "--run-name", name]
    for override in overrides:
        arguments += ["--set", override]
    started = time.time()
    status = distill.main(arguments)
    if status != 0:
        raise SystemExit(f"the {method} run (seed {seed}) failed with exit code {status}")
    run = checkpoints / name
    summary = json.loads((run / "summary.json").read_text())
    training = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    speeds = [record["tokens_per_s"] for record in training if record["split"] == "train"][1:]  # after warm-up
    return {
        "validation_perplexity": summary["best_validation_perplexity"],
        "teacher_validation_perplexity": (summary["teacher"] or {}).get("validation", {}).get("perplexity"),
        "tokens_per_s": statistics.median(speeds) if speeds else None,
        "seconds": time.time() - started,
    }


def cache_build_seconds() -> float:
    """How long the newest teacher cache took to build (the one these runs used, or an earlier identical one)."""
    metas = sorted((REPO / "data" / "teacher_cache").glob("*/meta.json"), key=lambda path: path.stat().st_mtime)
    return json.loads(metas[-1].read_text())["seconds"] if metas else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="1 seed, 40 steps and the first 1000 samples (under 5 minutes)"
    )
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, or 1 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 150, 40 quick)")
    parser.add_argument(
        "--samples",
        type=int,
        default=None,
        help="use the first N samples (default all, 1000 quick); fewer make evaluation quicker",
    )
    arguments = parser.parse_args()
    seeds = range(arguments.seeds or (1 if arguments.quick else 3))
    steps = arguments.steps or (40 if arguments.quick else 150)
    max_samples = arguments.samples or (1000 if arguments.quick else None)
    os.chdir(REPO)  # the demo config's paths are relative to the repository
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.time()
    results: dict[str, list[dict]] = {method: [] for method in METHODS}
    with tempfile.TemporaryDirectory(prefix="quality-") as checkpoints:
        for seed in seeds:
            for method in METHODS:
                results[method].append(run_method(method, seed, steps, Path(checkpoints), max_samples))
    teacher = next(result["teacher_validation_perplexity"] for result in results["forward_kl"])
    print(
        f"\n{len(seeds)} seed(s) x {steps} optimizer steps of 16 samples, configs/tiny.yaml"
        f"{'' if max_samples is None else f' (first {max_samples} samples)'}; "
        f"teacher validation perplexity {teacher:.3f}"
    )
    print(f"{'method':<16}{'val. perplexity':>17}{'spread':>9}{'vs plain':>10}{'tokens/s':>10}   per seed")
    plain = statistics.mean(result["validation_perplexity"] for result in results["plain"])
    summary = {}
    for method, runs in results.items():
        values = [result["validation_perplexity"] for result in runs]
        mean = statistics.mean(values)
        spread = max(values) - min(values)
        speed = statistics.mean(result["tokens_per_s"] for result in runs if result["tokens_per_s"])
        summary[method] = round(mean, 4)
        print(
            f"{method:<16}{mean:>17.3f}{spread:>9.3f}{mean / plain:>10.3f}{speed:>10.0f}   "
            + " ".join(f"{value:.3f}" for value in values)
        )
    full, cached = (
        statistics.mean(result["tokens_per_s"] for result in results[name]) for name in ("forward_kl", "cached_top_k")
    )
    build = cache_build_seconds()
    print(
        f"cached top-{CACHE_TOP_K} teacher: {cached / full:.2f}x the full-teacher tokens/s per epoch after the "
        f"cache is built (built once in {build:.1f} s); validation perplexity "
        f"{summary['cached_top_k']:.3f} against {summary['forward_kl']:.3f} with the full distribution"
    )
    print(f"total {time.time() - started:.0f} s")
    print(
        json.dumps(
            {
                **summary,
                "teacher": round(teacher, 4),
                "seeds": len(seeds),
                "steps": steps,
                "cached_speedup": round(cached / full, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
