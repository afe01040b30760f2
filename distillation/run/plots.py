"""Read run directories and draw their loss curves: used by distill.py, the notebooks, and the command line.

    python3 -m distillation.run.plots RUN_DIR [RUN_DIR ...] [--output comparison.png]

writes `loss_curves.png` into each run directory and, for several runs, one comparison figure (validation
perplexity and the CE term against samples seen, one line per run; by default `comparison.png` beside the first
run, and `--output`'s folder is created). Runs whose validation records hold generation figures (ROUGE-L F1 of
greedy answers, the teacher's NLL of them) get a second row of panels with them, in both figures. Works without a display (matplotlib's Agg backend). What a damaged run
cannot give (a record without its split, step or samples_seen; a summary.json or config.yaml that cannot be read)
is left out and named in a `note:` line; a directory without metrics.jsonl, or a figure that cannot be written, is
one sentence and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from distillation.base import storage
from distillation.base.errors import UserError, first_line

CURVES_FILE = "loss_curves.png"
COMPARISON_FILE = "comparison.png"
# The generation figures of validation and test records and summary.json's test (greedy answers to the first
# generation_prompts prompts of the split): older runs, and runs with generation_prompts 0, have none of them, and
# a figure that could not be computed (teacher_nll without a teacher) is null.
GENERATION_FIGURES = {
    "rouge_l": "ROUGE-L F1",
    "teacher_nll": "teacher NLL per token",
    "response_length": "answer length",
    "eos_share": "answers ending in EOS",
    "generation_prompts": "prompts answered",
}
GENERATION_CURVES = ("rouge_l", "teacher_nll")  # the ones drawn over the run, each on its own axes


class NotARun(UserError):
    """A directory the readers cannot use as a run: no metrics.jsonl, or one that cannot be read at all."""


class UnwritableFigure(UserError):
    """A figure's destination cannot be written (a file where its folder should be, no permission, a full disk)."""


@dataclass
class Run:
    """What a run directory records: its resolved config, metrics.jsonl (by split) and summary.json. What could not
    be used (a damaged record, summary or config) is left out, each in one sentence of `problems`."""

    directory: Path
    config: dict
    records: list[dict]
    summary: dict | None = None
    label: str = field(default="")
    problems: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.directory.name

    @property
    def loss_name(self) -> str:
        """`DistillationLoss`, `ClassicLoss`...: the class from the config's `()` entry."""
        loss = _mapping(_mapping(self.config.get("training_parameters")).get("loss"))
        return str(loss.get("()", "?")).rsplit(".", 1)[-1]

    @property
    def best_directory(self) -> Path:
        """The run's best checkpoint (a Hugging Face model directory)."""
        name = _mapping(self.config.get("training_parameters")).get("checkpoints_name_best")
        return self.directory / (name if isinstance(name, str) and name else "best")

    @property
    def is_distilled(self) -> bool:
        return any(_number(record.get("kd")) is not None for record in self.records)

    def split(self, name: str) -> list[dict]:
        return [record for record in self.records if record["split"] == name]


def load_run(directory) -> Run:
    """The run in `directory`; NotARun where it has no readable metrics.jsonl. A record without its split, step or
    samples_seen (or with them of another type), a summary.json or config.yaml that is not the mapping written, or
    not UTF-8 text, or not JSON/YAML, is left out and named in `problems`."""
    directory = Path(directory)
    metrics = directory / "metrics.jsonl"
    if not metrics.is_file():
        raise NotARun(f"{directory} has no metrics.jsonl; give the directory of a run made by distill.py.")
    try:
        lines, damaged = storage.read_json_lines(metrics)  # a line cut by a crash does not hide the rest
    except OSError as error:
        raise NotARun(f"cannot read {metrics} ({error.strerror or error}); check its permissions.") from None
    records = [record for record in lines if _usable(record)]
    problems = []
    if damaged or len(records) < len(lines):
        problems.append(
            f"{metrics}: {len(damaged) + len(lines) - len(records)} of its records left out (not a JSON object, "
            f"or without a text split, a whole step and a number samples_seen)"
        )
    config = _read_mapping(directory / "config.yaml", yaml.safe_load, problems)
    summary = _read_mapping(directory / "summary.json", json.loads, problems)
    run = Run(directory, config or {}, records, summary, problems=problems)
    run.label = f"{run.name} ({run.loss_name})"
    return run


def _usable(record: dict) -> bool:
    """A metrics record the figures can place: its split, its step and the samples seen at it."""
    return (
        isinstance(record.get("split"), str)
        and isinstance(record.get("step"), int)
        and not isinstance(record.get("step"), bool)
        and _number(record.get("samples_seen")) is not None
    )


def _read_mapping(path: Path, parse, problems: list[str]) -> dict | None:
    """The mapping the file holds, or None (absent, or left out with a sentence in `problems`)."""
    if not path.is_file():
        return None
    try:
        value = parse(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        problems.append(f"{path} is not UTF-8 text, so it is left out")
        return None
    except (OSError, ValueError, yaml.YAMLError) as error:
        problems.append(f"{path} cannot be read ({first_line(error)}), so it is left out")
        return None
    if not isinstance(value, dict):
        problems.append(f"{path} holds a {type(value).__name__}, not the mapping a run writes, so it is left out")
        return None
    return value


def _mapping(value) -> dict:
    return value if isinstance(value, dict) else {}


def _number(value) -> float | None:
    """`value` where it is a number (a JSON number; not true or false), else None."""
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def latest_runs(checkpoints: str | Path, prefix: str = "") -> list[Path]:
    """The newest finished run (it has summary.json) of each loss class under `checkpoints` whose name starts with
    `prefix`: by default the distilled and the plain run that the demo made. A directory that is not a run (no
    metrics.jsonl) is passed over."""
    newest: dict[str, Path] = {}
    candidates = sorted(Path(checkpoints).glob(f"{prefix}*/summary.json"), key=lambda path: path.stat().st_mtime)
    for summary in candidates:
        try:
            newest[load_run(summary.parent).loss_name] = summary.parent
        except NotARun:
            continue
    return sorted(newest.values())


def series(records: list[dict], key: str, along: str = "samples_seen") -> tuple[list[float], list[float]]:
    """The values of `key` against `along` in `records`, where both are numbers (a value left null, or damaged, is
    not drawn)."""
    points = [(_number(record.get(along)), _number(record.get(key))) for record in records]
    points = [(x, y) for x, y in points if x is not None and y is not None]
    return [x for x, _ in points], [y for _, y in points]


def generation_curves(runs: list[Run]) -> list[str]:
    """The generation figures (of GENERATION_CURVES) that a validation record of one of `runs` holds as a number."""
    return [key for key in GENERATION_CURVES if any(series(run.split("validation"), key)[0] for run in runs)]


def plot_run(run: Run, figure=None):
    """The training and validation curves of one run against samples seen: total loss, and each term on its own
    axes (the KD and CE terms of a distilled run have different scales); below them, the validation generation
    figures, where the run has them."""
    import matplotlib.pyplot as plt

    keys = ["loss", "kd", "ce"] if run.is_distilled else ["ce"]
    titles = {"loss": "total loss", "kd": "KD term", "ce": "CE term (student next-token loss)"}
    generated = generation_curves([run])
    columns, rows = max(len(keys), len(generated)), 2 if generated else 1
    if figure is None:
        figure = plt.figure(figsize=(5 * columns, 3.8 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    drawn = []
    for axis, key in zip(axes[0], keys):
        for split, style in (("train", "-"), ("validation", "o-")):
            xs, ys = series(run.split(split), key)
            if xs:
                axis.plot(xs, ys, style, label=split, markersize=4)
        axis.set_title(titles[key])
        drawn.append(axis)
    for axis, key in zip(axes[1] if generated else [], generated):
        axis.plot(*series(run.split("validation"), key), "o-", label="validation", markersize=4)
        axis.set_title(f"{GENERATION_FIGURES[key]} of greedy answers")
        drawn.append(axis)
    for axis in axes.flat:
        if axis not in drawn:  # a row with fewer panels than the other
            axis.set_visible(False)
            continue
        axis.set_xlabel("samples seen")
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:  # a run stopped before its first record of this term has none
            axis.legend()
    figure.suptitle(run.label)
    figure.tight_layout()
    return figure


def plot_comparison(runs: list[Run], figure=None):
    """Several runs on shared axes: validation perplexity and training CE against samples seen. The CE term is the
    quantity every run shares (a plain run has no KD term), so distilled and plain students compare on it. Where a
    run has generation figures, a second row compares their validation ROUGE-L and teacher NLL."""
    import matplotlib.pyplot as plt

    generated = generation_curves(runs)
    if figure is None:
        figure = plt.figure(figsize=(11, 8 if generated else 4))
    axes = figure.subplots(2 if generated else 1, 2, squeeze=False)
    perplexity_axis, ce_axis = axes[0]
    for run in runs:
        xs, ys = series(run.split("validation"), "perplexity")
        perplexity_axis.plot(xs, ys, "o-", label=run.label, markersize=4)
        xs, ys = series(run.split("train"), "ce")
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
    for axis, key in zip(axes[1] if generated else [], generated):
        for run in runs:
            xs, ys = series(run.split("validation"), key)
            if xs:  # a plain run has no teacher_nll: no line, and no entry in the legend
                axis.plot(xs, ys, "o-", label=run.label, markersize=4)
        axis.set_title(f"validation {GENERATION_FIGURES[key]} of greedy answers")
    if len(generated) == 1:
        axes[1][1].set_visible(False)
    for axis in axes.flat:
        axis.set_xlabel("samples seen")
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def _teacher_perplexity(run: Run) -> float | None:
    teacher = _mapping(_mapping(run.summary).get("teacher"))
    return _number(_mapping(teacher.get("validation")).get("perplexity"))


def summary_rows(runs: list[Run]) -> list[dict]:
    """One row per run: what a comparison table needs, from summary.json and metrics.jsonl."""
    rows = []
    for run in runs:
        summary = _mapping(run.summary)
        test, teacher = _mapping(summary.get("test")), _mapping(summary.get("teacher"))
        speeds = [speed for speed in (_number(r.get("tokens_per_s")) for r in run.split("train")) if speed]
        row = {
            "run": run.name,
            "loss": run.loss_name,
            "steps": summary.get("steps"),
            "best step": summary.get("best_step"),
            "best validation perplexity": summary.get("best_validation_perplexity"),
            "test perplexity": test.get("perplexity"),
            "teacher test perplexity": _mapping(teacher.get("test")).get("perplexity"),
            "test KL to teacher": test.get("kl_teacher"),
            "test top-1 agreement": test.get("top1_agreement"),
        }
        if any(key in test for key in GENERATION_FIGURES):  # a run made before them has no such columns
            row.update({f"test {label}": test.get(key) for key, label in GENERATION_FIGURES.items()})
        row["tokens/s"] = round(sum(speeds) / len(speeds)) if speeds else None
        row["wall time (s)"] = summary.get("wall_time_s")
        rows.append(row)
    return rows


def save(figure, path: Path) -> Path:
    figure.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path


def write_comparison(runs: list[Run], path: Path) -> Path:
    """Draw the comparison of `runs` into `path` (its folder made first); UnwritableFigure where it cannot be."""
    _use_file_backend()
    return _write(plot_comparison(runs), path)


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
    parser.add_argument(
        "--output",
        help="where to write the comparison of several runs (default: beside the first); its folder is created",
    )
    arguments = parser.parse_args(argv)
    try:
        runs = [load_run(directory) for directory in arguments.runs]
        _use_file_backend()
        drawn = [run for run in runs if _draw_curves(run)]
        if len(drawn) > 1:
            output = Path(arguments.output) if arguments.output else drawn[0].directory.parent / COMPARISON_FILE
            print(write_comparison(drawn, output))
        elif arguments.output:
            print(
                f"note: fewer than two runs to compare, so no comparison is written to {arguments.output}",
                file=sys.stderr,
            )
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _draw_curves(run: Run) -> bool:
    """Draw the run's curves, after naming what of it was left out; False for a run with no record to draw."""
    for problem in run.problems:
        print(f"note: {problem}.", file=sys.stderr)
    if not run.records:
        print(
            f"note: {run.directory} has no usable record in metrics.jsonl, so nothing of it is drawn.", file=sys.stderr
        )
        return False
    print(_write(plot_run(run), run.directory / CURVES_FILE))
    return True


def _write(figure, path: Path) -> Path:
    """save(), its folder made first; a place that cannot be written is one sentence (UnwritableFigure)."""
    problem, _created = storage.make_folder(path.parent)
    if problem is None:
        try:
            return save(figure, path)
        except OSError as error:
            problem = error.strerror or first_line(error)
    raise UnwritableFigure(
        f"cannot write the figure {path} ({problem}); give an --output in a folder you can write to."
    )


if __name__ == "__main__":
    sys.exit(main())
