"""Does distillation beat plain training at equal steps, and which method? Measured on the embedded benchmark.

    python3 -m bench.quality                    # where the responses come from: 5 methods x 3 seeds, 150 steps
    python3 -m bench.quality --compare losses   # the losses on the data's responses: 6 methods x 3 seeds
    python3 -m bench.quality --quick            # 1 seed, 40 steps, the first 1000 samples

Every run is `distill.py --config configs/tiny.yaml` (the 4-layer teacher and 2-layer student of the offline
demo) with the same seed (so the same split, student initialisation and batch order), the same data and number of
optimizer steps, changing one thing:
- plain: next-token training alone (loss.ClassicLoss), no teacher;
- forward_kl: the default distillation loss (alpha KL(teacher || student) + beta CE) on the data's responses
  (supervised KD);
- reverse_kl, jsd: the same with `divergence: reverse_kl` or `jsd` (jsd_beta 0.5);
- teacher_layers: forward_kl, with the student initialised from evenly spaced teacher blocks (`student.init:
  uniform`) instead of random weights;
- cached_top_k: forward_kl against the teacher's top-k distributions cached on disk (`teacher.cache_top_k`); the
  first seed builds the cache, the later seeds (and later runs) only read it;
- on_policy: every step's responses are the student's samples of the step's prompts (`responses.lmbda: 1`), with
  reverse KL (MiniLLM's and TRL's DistillationTrainer's divergence) and no CE term on them (the default);
- mixed: `lmbda: 0.5`, reverse KL: each step is the student's samples or the data's, half and half (GKD);
- seq_kd: every step's responses are the teacher's generations (`responses.seq_kd: true`, sequence-level KD),
  with forward_kl's loss: it differs from forward_kl only in where the responses come from.
Every run scores the greedy answers of the student to the first `--prompts` prompts of the validation and test
splits (ROUGE-L F1 against the reference, the teacher's NLL per token of the answer, the answer length and the
share that ends in EOS: training_parameters.generation_prompts) up to `--max-new-tokens` tokens, the same cap as
the generated responses. The figures are each run's own, read from its summary.json (the test split, scored on
its checkpoint of best validation perplexity, the last one unless the table says otherwise).
It prints each method's mean and spread (max - min) over the seeds beside the teacher's, and as its last line one
JSON object: each method's mean validation perplexity, and under "test" each method's test figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat
from multiprocessing import get_context
from pathlib import Path

import yaml

import distill
from distillation.settings.config import load_config, to_plain_dict

REPO = Path(__file__).resolve().parent.parent
CACHE_TOP_K = 16
ON_POLICY_DIVERGENCE = "training_parameters.loss.divergence=reverse_kl"
METHODS = {
    "plain": ["training_parameters.loss={'()': loss.ClassicLoss}"],
    "forward_kl": [],
    "reverse_kl": ["training_parameters.loss.divergence=reverse_kl"],
    "jsd": ["training_parameters.loss.divergence=jsd"],
    "teacher_layers": ["student.init=uniform"],  # after --student-init: it wins
    "cached_top_k": [f"teacher.cache_top_k={CACHE_TOP_K}"],
    "on_policy": ["responses.lmbda=1", ON_POLICY_DIVERGENCE],
    "mixed": ["responses.lmbda=0.5", ON_POLICY_DIVERGENCE],
    "seq_kd": ["responses.seq_kd=true"],
}
COMPARISONS = {
    # reverse_kl (on the data's responses) is on_policy's divergence without its samples: the two rows part what
    # the samples buy from what the divergence does.
    "responses": ("plain", "forward_kl", "reverse_kl", "on_policy", "mixed", "seq_kd"),
    "losses": ("plain", "forward_kl", "reverse_kl", "jsd", "teacher_layers", "cached_top_k"),
    "all": tuple(METHODS),
}
# The generation figures of summary.json's test split (null where a run cannot compute one, e.g. teacher_nll
# without a teacher); absent from runs of a version that does not score answers.
FIGURES = ("rouge_l", "teacher_nll", "response_length", "eos_share")


def overrides(method: str, seed: int, settings: argparse.Namespace, checkpoints: Path) -> list[str]:
    """The `--set` overrides of configs/tiny.yaml for one run: the settings every method shares, then the method's."""
    steps = settings.steps
    return [
        f"seed={seed}",
        f"data.max_samples={'null' if settings.samples is None else settings.samples}",
        f"paths.checkpoints={checkpoints}",
        f"student.init={settings.student_init}",
        f"training_parameters.max_steps={steps}",
        "training_parameters.eval_every_steps=null",  # validations at the epochs' ends and the last step only
        # The test split is scored on the checkpoint of best validation perplexity: the same choice for every method
        # (each loss's own validation loss would choose by different yardsticks).
        "training_parameters.best_metric=perplexity",
        f"training_parameters.log_every_steps={max(1, min(10, steps // 4))}",  # a few throughput records
        "training_parameters.checkpoint_every_steps=null",
        "training_parameters.report_to=none",
        "training_parameters.sample_prompts=0",  # samples.jsonl: not a figure here
        f"training_parameters.generation_prompts={settings.prompts}",
        f"responses.max_new_tokens={settings.max_new_tokens}",
        *METHODS[method],
    ]


def run_method(method: str, seed: int, settings: argparse.Namespace, checkpoints: Path) -> dict:
    name = f"{method}-seed{seed}"
    run = checkpoints / name
    if settings.reuse and (run / "summary.json").is_file():
        check_reused(run, method, seed, settings, checkpoints)
    else:
        arguments = ["--config", str(REPO / "configs" / "tiny.yaml"), "--run-name", name]
        for override in overrides(method, seed, settings, checkpoints):
            arguments += ["--set", override]
        status = distill.main(arguments)
        if status != 0:
            raise SystemExit(f"the {method} run (seed {seed}) failed with exit code {status}")
    summary = json.loads((run / "summary.json").read_text())
    training = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    training = [record for record in training if record["split"] == "train"]
    speeds = [record["tokens_per_s"] for record in training][1:]  # after warm-up
    teacher = summary["teacher"] or {}
    return {
        "validation_perplexity": summary["best_validation_perplexity"],
        "best_step": summary["best_step"],
        "test_perplexity": summary["test"]["perplexity"],
        **{figure: summary["test"].get(figure) for figure in FIGURES},
        "teacher_validation_perplexity": teacher.get("validation", {}).get("perplexity"),
        "teacher_test_perplexity": teacher.get("test", {}).get("perplexity"),
        "tokens_per_s": statistics.median(speeds) if speeds else None,
        "generation_s": sum(record.get("generation_s", 0.0) for record in training),
        "seconds": summary["wall_time_s"],
    }


def check_reused(run: Path, method: str, seed: int, settings: argparse.Namespace, checkpoints: Path) -> None:
    """A finished run that --reuse reads instead of training it again must be the run this command would train."""
    wanted = to_plain_dict(load_config(REPO / "configs" / "tiny.yaml", overrides(method, seed, settings, checkpoints)))
    if yaml.safe_load((run / "config.yaml").read_text()) != wanted:
        raise SystemExit(
            f"{run} was trained with other settings than this command's {method} run (seed {seed}); pass another "
            f"--runs folder, or the settings it was trained with."
        )


def run_seed(seed: int, methods: tuple[str, ...], settings: argparse.Namespace, checkpoints: Path) -> dict:
    """Every method's run for one seed, one after the other: the seed's split and caches are built by its first run
    and read by the others, never built by two processes at once."""
    return {method: run_method(method, seed, settings, checkpoints) for method in methods}


def run_all(methods: tuple[str, ...], settings: argparse.Namespace, checkpoints: Path) -> dict[str, list[dict]]:
    """Each method's runs, one per seed; with --jobs, that many seeds at a time, each in its own process."""
    seeds = range(settings.seeds)
    if settings.jobs > 1:
        with ProcessPoolExecutor(settings.jobs, mp_context=get_context("spawn")) as pool:
            per_seed = list(pool.map(run_seed, seeds, repeat(methods), repeat(settings), repeat(checkpoints)))
    else:
        per_seed = [run_seed(seed, methods, settings, checkpoints) for seed in seeds]
    return {method: [runs[method] for runs in per_seed] for method in methods}


def cache_build_seconds() -> float:
    """How long the newest teacher cache took to build (the one these runs used, or an earlier identical one)."""
    metas = sorted((REPO / "data" / "teacher_cache").glob("*/meta.json"), key=lambda path: path.stat().st_mtime)
    return json.loads(metas[-1].read_text())["seconds"] if metas else float("nan")


def spread_of(runs: list[dict], key: str) -> tuple[float | None, float | None]:
    """The mean and spread (max - min) of `key` over the runs, or (None, None) where a run has no value."""
    values = [run[key] for run in runs]
    if not values or any(value is None for value in values):
        return None, None
    return statistics.mean(values), max(values) - min(values)


def cell(value: float | None, width: int, digits: int = 3) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def print_table(results: dict[str, list[dict]]) -> dict[str, dict]:
    """The table of every method's means and spreads over the seeds; returns the means (and spreads) by method."""
    print(
        f"{'method':<16}{'test ppl':>9}{'spread':>8}{'ROUGE-L':>9}{'spread':>8}{'teacher NLL':>12}{'length':>8}"
        f"{'EOS':>6}{'val ppl':>9}{'tokens/s':>9}{'gen. s':>8}{'s/run':>7}"
    )
    means = {}
    for method, runs in results.items():
        test, test_spread = spread_of(runs, "test_perplexity")
        rouge, rouge_spread = spread_of(runs, "rouge_l")
        nll, length, eos = (spread_of(runs, figure)[0] for figure in ("teacher_nll", "response_length", "eos_share"))
        validation = spread_of(runs, "validation_perplexity")[0]
        speeds = [run["tokens_per_s"] for run in runs if run["tokens_per_s"]]
        speed = statistics.mean(speeds) if speeds else None
        generation, seconds = (statistics.mean(run[key] for run in runs) for key in ("generation_s", "seconds"))
        print(
            f"{method:<16}{cell(test, 9)}{cell(test_spread, 8)}{cell(rouge, 9)}{cell(rouge_spread, 8)}"
            f"{cell(nll, 12)}{cell(length, 8, 1)}{cell(eos, 6, 2)}{cell(validation, 9)}{cell(speed, 9, 0)}"
            f"{generation:>8.0f}{seconds:>7.0f}"
        )
        means[method] = {
            "validation_perplexity": validation,
            "perplexity": test,
            "perplexity_spread": test_spread,
            "rouge_l": rouge,
            "rouge_l_spread": rouge_spread,
            "teacher_nll": nll,
            "response_length": length,
            "eos_share": eos,
        }
    for method, runs in results.items():
        per_seed = (
            f"{run['test_perplexity']:.3f}" + ("" if run["rouge_l"] is None else f"/{run['rouge_l']:.3f}")
            for run in runs
        )
        print(f"{method:<16}per seed (test ppl/ROUGE-L): {' '.join(per_seed)}")
    return means


def print_cache_speedup(results: dict[str, list[dict]], means: dict[str, dict]) -> float:
    full, cached = (
        statistics.mean(result["tokens_per_s"] for result in results[name]) for name in ("forward_kl", "cached_top_k")
    )
    print(
        f"cached top-{CACHE_TOP_K} teacher: {cached / full:.2f}x the full-teacher tokens/s per epoch after the "
        f"cache is built (built once in {cache_build_seconds():.1f} s); validation perplexity "
        f"{means['cached_top_k']['validation_perplexity']:.3f} against "
        f"{means['forward_kl']['validation_perplexity']:.3f} with the full distribution"
    )
    return cached / full


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", choices=COMPARISONS, default="responses", help="which methods (default responses)")
    parser.add_argument("--quick", action="store_true", help="1 seed, 40 steps, the first 1000 samples, short answers")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, or 1 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 150, 40 quick)")
    parser.add_argument(
        "--samples",
        type=int,
        default=None,
        help="use the first N samples (default all, 1000 quick); fewer make evaluation quicker",
    )
    parser.add_argument(
        "--prompts", type=int, default=None, help="prompts whose answers are scored (default 64, 8 quick)"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="the most tokens of a generated response or scored answer (default 64, 16 quick)",
    )
    parser.add_argument(
        "--student-init",
        choices=("random", "uniform"),
        default="random",
        help="every student's initial weights: random (configs/tiny.yaml's) or the teacher's blocks 0 and 3 (uniform)",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="seeds trained at a time, each in its own process (default 1)"
    )
    parser.add_argument("--runs", type=Path, default=None, help="keep the runs in this folder (default: deleted)")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="with --runs: read the runs already finished there (checked to be this command's) instead of training "
        "them again, e.g. to finish an interrupted comparison",
    )
    settings = parser.parse_args()
    quick = settings.quick
    settings.seeds = settings.seeds or (1 if quick else 3)
    settings.steps = settings.steps or (40 if quick else 150)
    settings.samples = settings.samples or (1000 if quick else None)
    settings.prompts = settings.prompts if settings.prompts is not None else (8 if quick else 64)
    settings.max_new_tokens = settings.max_new_tokens or (16 if quick else 64)
    settings.runs = settings.runs and settings.runs.resolve()  # before main moves to the repository
    return settings


def main() -> None:
    settings = parse_arguments()
    methods = COMPARISONS[settings.compare]
    os.chdir(REPO)  # the demo config's paths are relative to the repository
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="quality-") as temporary:
        results = run_all(methods, settings, settings.runs or Path(temporary))
    teacher_runs = [run for runs in results.values() for run in runs if run["teacher_validation_perplexity"]]
    teacher, teacher_test = (teacher_runs[0][f"teacher_{split}_perplexity"] for split in ("validation", "test"))
    print(
        f"\n{settings.seeds} seed(s) x {settings.steps} optimizer steps of 16 samples, configs/tiny.yaml"
        f"{'' if settings.samples is None else f' (first {settings.samples} samples)'}; answers of at most "
        f"{settings.max_new_tokens} tokens to the first {settings.prompts} prompts; teacher perplexity "
        f"{teacher:.3f} (validation), {teacher_test:.3f} (test)"
    )
    means = print_table(results)
    earlier = [
        f"{method} seed {seed} (step {run['best_step']})"
        for method, runs in results.items()
        for seed, run in enumerate(runs)
        if run["best_step"] != settings.steps
    ]
    if earlier:
        print(f"tested on an earlier checkpoint (a better validation perplexity): {', '.join(earlier)}")
    extra = {}
    if "cached_top_k" in results and "forward_kl" in results:
        extra["cached_speedup"] = round(print_cache_speedup(results, means), 3)
    print(f"total {time.time() - started:.0f} s")
    rounded = {
        method: {key: None if value is None else round(value, 4) for key, value in figures.items()}
        for method, figures in means.items()
    }
    print(
        json.dumps(
            {
                **{method: figures["validation_perplexity"] for method, figures in rounded.items()},
                "test": rounded,
                "teacher": round(teacher, 4),
                "teacher_test": round(teacher_test, 4),
                "seeds": settings.seeds,
                "steps": settings.steps,
                **extra,
            }
        )
    )


if __name__ == "__main__":
    main()
