"""The end of `--plain-baseline`: the distilled run and its plain baseline side by side, read from their
summary.json (test perplexity, the generation figures of their greedy answers, the teacher's perplexity), and their
comparison figure (plots.plot_comparison) drawn into the distilled run's directory.

Both runs are complete by then: what this cannot read or draw (a summary.json without a figure, damaged, a figure
the disk refuses) is a `-` in the table or a warning, never a failed command.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from distillation.base.errors import UserError, first_line
from distillation.run import plots

logger = logging.getLogger("distill")

TEACHER_COLUMN = "teacher"
# The table's rows: its name, and the key of summary.json's `test` that holds it. Test perplexity always; the
# generation figures where one of the runs scored its answers.
TABLE_ROWS = (
    ("test perplexity", "perplexity"),
    ("test ROUGE-L F1", "rouge_l"),
    ("test teacher NLL per answer token", "teacher_nll"),
    ("test answer length (new tokens)", "response_length"),
    ("test answers ending in EOS", "eos_share"),
    ("test prompts answered", "generation_prompts"),
)


def report(run_directory: Path, baseline_directory: Path) -> tuple[list[dict], Path | None]:
    """Log both runs side by side and draw their comparison into `<run>/comparison.png`: (the table's rows, the
    figure's path or None). Only the main process of a distributed launch does it; the others return ([], None)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return [], None
    try:
        runs = [plots.load_run(run_directory), plots.load_run(baseline_directory)]
    except UserError as error:  # a run without its metrics.jsonl: removed by hand since it completed
        logger.warning("The runs are not compared: %s", error)
        return [], None
    rows = side_by_side(runs)
    logger.info(
        "%s against its plain baseline, best checkpoints:\n%s",
        runs[0].name,
        table_text(rows, [run.name for run in runs]),
    )
    figure = _draw(runs, run_directory / plots.COMPARISON_FILE)
    if figure is not None:
        logger.info("Comparison figure: %s", figure)
    return rows, figure


def side_by_side(runs: list[plots.Run]) -> list[dict]:
    """One row per figure: {"figure": its name, <each run's name>: its value, "teacher": the teacher's}, values as
    the runs' summary.json hold them (None where one lacks it). The teacher's is its test perplexity, from the
    first run that had a teacher; it has no generation figures."""
    tests = {run.name: _mapping(_mapping(run.summary).get("test")) for run in runs}
    teacher = next((_teacher_test_perplexity(run) for run in runs if _teacher_test_perplexity(run) is not None), None)
    # Neither run scored answers (made before the figures, or generation_prompts 0): the test perplexity alone.
    scored = any(_number(test.get(key)) for test in tests.values() for _, key in TABLE_ROWS[1:])
    rows = []
    for name, key in TABLE_ROWS if scored else TABLE_ROWS[:1]:
        values = {run: _number(test.get(key)) for run, test in tests.items()}
        rows.append({"figure": name, **values, TEACHER_COLUMN: teacher if key == "perplexity" else None})
    return rows


def table_text(rows: list[dict], columns: list[str]) -> str:
    """The rows as an aligned text table, a column per run and one for the teacher; `-` for a missing value."""
    header = ["", *columns, TEACHER_COLUMN]
    lines = [header] + [
        [row["figure"], *(_cell(row.get(column)) for column in [*columns, TEACHER_COLUMN])] for row in rows
    ]
    widths = [max(len(line[index]) for line in lines) for index in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) if index == 0 else cell.rjust(width)
            for index, (cell, width) in enumerate(zip(line, widths))
        ).rstrip()
        for line in lines
    )


def _draw(runs: list[plots.Run], path: Path) -> Path | None:
    try:
        return plots.write_comparison(runs, path)
    except ImportError:  # matplotlib is not installed: the table says it all
        return None
    except (UserError, OSError) as error:
        logger.warning("The comparison figure %s is not drawn: %s", path, first_line(error))
        return None


def _cell(value) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def _mapping(value) -> dict:
    return value if isinstance(value, dict) else {}


def _number(value) -> float | None:
    """`value` where it is a number (not true or false), else None: a figure written by hand or damaged is `-`."""
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _teacher_test_perplexity(run: plots.Run) -> float | None:
    teacher = _mapping(_mapping(run.summary).get("teacher"))
    return _number(_mapping(teacher.get("test")).get("perplexity"))
