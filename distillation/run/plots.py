"""Read run directories and draw their loss curves: used by distill.py, the notebooks, and the command line.

    python3 -m distillation.run.plots RUN_DIR [RUN_DIR ...] [--output comparison.png]

writes `loss_curves.png` into each run directory and, for several runs, one comparison figure (validation
perplexity and the CE term against samples seen, one line per run; by default `comparison.png` beside the first
run). Works without a display (matplotlib's Agg backend).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from distillation.base import storage

CURVES_FILE = "loss_curves.png"


@dataclass
class Run:
    """What a run directory records: its resolved config, metrics.jsonl (by split) and summary.json."""

    directory: Path
    config: dict
    records: list[dict]
    summary: dict | None = None
    label: str = field(default="")

    @property
    def name(self) -> str:
        return self.directory.name

    @property
    def loss_name(self) -> str:
        """`DistillationLoss`, `ClassicLoss`...: the class from the config's `()` entry."""
        loss = (self.config.get("training_parameters") or {}).get("loss") or {}
        return str(loss.get("()", "?")).rsplit(".", 1)[-1]

    @property
    def best_directory(self) -> Path:
        """The run's best checkpoint (a Hugging Face model directory)."""
        name = (self.config.get("training_parameters") or {}).get("checkpoints_name_best") or "best"
        return self.directory / name

    @property
    def is_distilled(self) -> bool:
        return any(record.get("kd") is not None for record in self.records)

    def split(self, name: str) -> list[dict]:
        return [record for record in self.records if record["split"] == name]


def load_run(directory) -> Run:
    directory = Path(directory)
    metrics = directory / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{directory} has no metrics.jsonl; give the directory of a run made by distill.py")
    records, _damaged = storage.read_json_lines(metrics)  # a line cut by a crash does not hide the rest
    config_file = directory / "config.yaml"
    config = yaml.safe_load(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    summary_file = directory / "summary.json"
    summary = json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.is_file() else None
    run = Run(directory, config or {}, records, summary)
    run.label = f"{run.name} ({run.loss_name})"
    return run


def latest_runs(checkpoints: str | Path, prefix: str = "") -> list[Path]:
    """The newest finished run (it has summary.json) of each loss class under `checkpoints` whose name starts with
    `prefix`: by default the distilled and the plain run that the demo made."""
    newest: dict[str, Path] = {}
    candidates = sorted(Path(checkpoints).glob(f"{prefix}*/summary.json"), key=lambda path: path.stat().st_mtime)
    for summary in candidates:
        newest[load_run(summary.parent).loss_name] = summary.parent
    return sorted(newest.values())


def _axis_values(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(record["samples_seen"], record[key]) for record in records if record.get(key) is not None]
    return [x for x, _ in points], [y for _, y in points]


def plot_run(run: Run, figure=None):
    """The training and validation curves of one run against samples seen: total loss, and each term on its own
    axes (the KD and CE terms of a distilled run have different scales)."""
    import matplotlib.pyplot as plt

    keys = ["loss", "kd", "ce"] if run.is_distilled else ["ce"]
    titles = {"loss": "total loss", "kd": "KD term", "ce": "CE term (student next-token loss)"}
    if figure is None:
        figure = plt.figure(figsize=(5 * len(keys), 3.8))
    axes = figure.subplots(1, len(keys), squeeze=False)[0]
    for axis, key in zip(axes, keys):
        for split, style in (("train", "-"), ("validation", "o-")):
            xs, ys = _axis_values(run.split(split), key)
            if xs:
                axis.plot(xs, ys, style, label=split, markersize=4)
        axis.set_title(titles[key])
        axis.set_xlabel("samples seen")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(run.label)
    figure.tight_layout()
    return figure


def plot_comparison(runs: list[Run], figure=None):
    """Several runs on shared axes: validation perplexity and training CE against samples seen. The CE term is the
    quantity every run shares (a plain run has no KD term), so distilled and plain students compare on it."""
    import matplotlib.pyplot as plt

    if figure is None:
        figure = plt.figure(figsize=(11, 4))
    perplexity_axis, ce_axis = figure.subplots(1, 2)
    for run in runs:
        xs, ys = _axis_values(run.split("validation"), "perplexity")
        perplexity_axis.plot(xs, ys, "o-", label=run.label, markersize=4)
        xs, ys = _axis_values(run.split("train"), "ce")
        ce_axis.plot(xs, ys, label=run.label)
    teacher = next((_teacher_perplexity(run) for run in runs if _teacher_perplexity(run) is not None), None)
    if teacher is not None:
        perplexity_axis.axhline(teacher, color="grey", linestyle="--", label="teacher")
    perplexity_axis.set_title("validation perplexity")
    perplexity_axis.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter

    for formatter in (perplexity_axis.yaxis.set_major_formatter, perplexity_axis.yaxis.set_minor_formatter):
        formatter(FormatStrFormatter("%g"))  # 4, 6, 10 rather than 4x10^0
    ce_axis.set_title("training CE")
    for axis in (perplexity_axis, ce_axis):
        axis.set_xlabel("samples seen")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def _teacher_perplexity(run: Run) -> float | None:
    teacher = (run.summary or {}).get("teacher") or {}
    return (teacher.get("validation") or {}).get("perplexity")


def summary_rows(runs: list[Run]) -> list[dict]:
    """One row per run: what a comparison table needs, from summary.json and metrics.jsonl."""
    rows = []
    for run in runs:
        summary = run.summary or {}
        test = summary.get("test") or {}
        teacher = summary.get("teacher") or {}
        speeds = [record["tokens_per_s"] for record in run.split("train") if record.get("tokens_per_s")]
        rows.append(
            {
                "run": run.name,
                "loss": run.loss_name,
                "steps": summary.get("steps"),
                "best step": summary.get("best_step"),
                "best validation perplexity": summary.get("best_validation_perplexity"),
                "test perplexity": test.get("perplexity"),
                "teacher test perplexity": (teacher.get("test") or {}).get("perplexity"),
                "test KL to teacher": test.get("kl_teacher"),
                "test top-1 agreement": test.get("top1_agreement"),
                "tokens/s": round(sum(speeds) / len(speeds)) if speeds else None,
                "wall time (s)": summary.get("wall_time_s"),
            }
        )
    return rows


def save(figure, path: Path) -> Path:
    figure.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path


def write_run_curves(directory) -> Path:
    """Draw one run's curves into `<directory>/loss_curves.png` and return that path."""
    _use_file_backend()
    run = load_run(directory)
    return save(plot_run(run), run.directory / CURVES_FILE)


def _use_file_backend() -> None:
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")  # no display needed; a notebook that imported pyplot keeps its own backend


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories (checkpoints/<run name>)")
    parser.add_argument("--output", help="where to write the comparison of several runs (default: beside the first)")
    arguments = parser.parse_args(argv)
    try:
        runs = [load_run(directory) for directory in arguments.runs]
    except (FileNotFoundError, json.JSONDecodeError, yaml.YAMLError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    _use_file_backend()
    for run in runs:
        print(save(plot_run(run), run.directory / CURVES_FILE))
    if len(runs) > 1:
        output = Path(arguments.output) if arguments.output else runs[0].directory.parent / "comparison.png"
        print(save(plot_comparison(runs), output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
