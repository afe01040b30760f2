"""What reads a run's records shows the generation figures (ROUGE-L F1 of greedy answers, the teacher's NLL of them,
their length and EOS share) where the run has them, and reads as before where it has none (a run made before them,
generation_prompts 0, a plain run's null teacher_nll): the model card, the plots, and the side-by-side table and
figure at the end of --plain-baseline. The run directories are written here by the project's own record writers,
without training: a few records and a saved tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distillation.run import baseline_comparison, model_card, plots, records
from distillation.run.checkpoints import TrainerState
from distillation.run.runs import RunLocation
from distillation.settings.config import dump_config, load_config
from helpers import base_config, save_gpt2, write_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS = (4, 8, 12)  # a validation at each, a training record at each
# What a run that scored its answers on 5 prompts records at each validation, and on the test split.
VALIDATION_GENERATION = [
    {"rouge_l": 0.1, "teacher_nll": 4.0, "response_length": 20.0, "eos_share": 0.2, "generation_prompts": 5},
    {"rouge_l": 0.2, "teacher_nll": 3.0, "response_length": 15.5, "eos_share": 0.6, "generation_prompts": 5},
    {"rouge_l": 0.3, "teacher_nll": 2.5, "response_length": 12.0, "eos_share": 0.8, "generation_prompts": 5},
]
TEST_GENERATION = {
    "rouge_l": 0.25,
    "teacher_nll": 2.75,
    "response_length": 12.5,
    "eos_share": 0.8,
    "generation_prompts": 5,
}
# A plain run has no teacher to score its answers; a run with generation_prompts 0 scores none.
PLAIN_GENERATION = {
    "rouge_l": 0.125,
    "teacher_nll": None,
    "response_length": 18.0,
    "eos_share": 0.4,
    "generation_prompts": 5,
}
UNSCORED = {"rouge_l": None, "teacher_nll": None, "response_length": None, "eos_share": None, "generation_prompts": 0}


def write_run(directory: Path, config, tokenizer, distilled: bool, generation: list[dict], test_generation: dict):
    """A complete run directory as the trainer leaves it: config.yaml, metrics.jsonl (training and validation
    records, then the test), summary.json and best/, written by records.MetricsLog, records.write_summary and
    dump_config; `generation` holds each validation's generation figures ({} for none)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    directory.mkdir(parents=True)
    dump_config(config, directory / "config.yaml")
    save_gpt2(directory / "best", tokenizer, nb_layers=1)
    log, state = records.MetricsLog(directory / "metrics.jsonl", accelerator), TrainerState()
    kd = 0.5 if distilled else None
    for step, figures in zip(STEPS, generation):
        state.global_step, state.samples_seen, state.tokens_seen = step, 8 * step, 200 * step
        log.write("train", {"loss": 3.0 - step / 10, "kd": kd, "ce": 2.0 - step / 10, "perplexity": 5.0}, state, step)
        validation = {"loss": 2.5, "kd": kd, "ce": 1.9 - step / 20, "perplexity": 6.0 - step / 10, **figures}
        log.write("validation", validation, state, step)
        state.record_validation(validation, "loss")
    test = {"loss": 2.4, "kd": kd, "ce": 1.5, "perplexity": 4.5, "target_tokens": 900, **test_generation}
    if distilled:
        test.update(kl_teacher=0.3, top1_agreement=0.6)
    log.write("test", test, state, 20.0)
    teacher = (
        {"validation": {"ce": 1.0, "perplexity": 2.7}, "test": {"ce": 0.9, "perplexity": 2.5}} if distilled else None
    )
    location = RunLocation(directory.name, directory, resume=False)
    records.write_summary(location, state, "loss", test, teacher, accelerator, 21.0, "alpaca")
    return directory


@pytest.fixture(scope="module")
def runs(tmp_path_factory, teacher_dir, data_file, tokenizer) -> dict[str, Path]:
    """Four complete runs: distilled and plain runs that scored their answers, a distilled run made before the
    generation figures (none in its records), and one with generation_prompts 0 (its figures null)."""
    root = tmp_path_factory.mktemp("reports")
    distilled = load_config(write_config(root / "config.yaml", base_config(root, teacher_dir, data_file)))
    plain_values = base_config(root, teacher_dir, data_file)
    plain_values["training_parameters"]["loss"] = {"()": "loss.ClassicLoss"}
    plain = load_config(write_config(root / "plain.yaml", plain_values))
    plain_validations = [
        {**figures, "rouge_l": figures["rouge_l"] / 2, "teacher_nll": None} for figures in VALIDATION_GENERATION
    ]
    made = {
        "scored": write_run(root / "scored", distilled, tokenizer, True, VALIDATION_GENERATION, TEST_GENERATION),
        "scored-plain": write_run(root / "scored-plain", plain, tokenizer, False, plain_validations, PLAIN_GENERATION),
        "older": write_run(root / "older", distilled, tokenizer, True, [{}] * len(STEPS), {}),
        "unscored": write_run(root / "unscored", distilled, tokenizer, True, [UNSCORED] * len(STEPS), UNSCORED),
    }
    return made


# ---------------------------------------------------------------- the model card


def card_of(run: Path):
    from huggingface_hub import ModelCard

    config = load_config(run / "config.yaml")
    return ModelCard.load(model_card.write_model_card(run, config))


def test_the_card_shows_the_test_answers_figures_and_says_what_they_are(runs):
    card = card_of(runs["scored"])
    summary_test = json.loads((runs["scored"] / "summary.json").read_text())["test"]
    for name, value in [
        ("ROUGE-L F1 of the answers", "0.25"),
        ("teacher NLL per answer token", "2.75"),
        ("answer length (new tokens)", "12.5"),
        ("share of answers ending in EOS", "0.8"),
    ]:
        assert f"| {name} | {value} | - |" in card.text
    assert "greedy answers to the first 5 test prompts: ROUGE-L F1 against the reference response" in card.text
    figures = {result.metric_name: result.metric_value for result in card.data.eval_results}
    assert figures["Test ROUGE-L F1 of greedy answers"] == summary_test["rouge_l"] == 0.25
    # A plain run: the teacher scored nothing, so its row shows no number.
    plain = card_of(runs["scored-plain"]).text
    assert "| teacher NLL per answer token | - | - |" in plain and "| ROUGE-L F1 of the answers | 0.125 | - |" in plain
    # A run made before the figures, and one with generation_prompts 0: the card of before.
    for name in ("older", "unscored"):
        card = card_of(runs[name])
        assert "answer" not in card.text and "ROUGE" not in card.text and "| perplexity | 4.5 | 2.5 |" in card.text
        assert "Test ROUGE-L F1 of greedy answers" not in {result.metric_name for result in card.data.eval_results}


# ---------------------------------------------------------------- the plots


def visible_panels(figure) -> dict[str, list[tuple[str, list[float]]]]:
    """{title: [(label, y values) of each line]} of the figure's visible axes."""
    return {
        axis.get_title(): [(line.get_label(), list(line.get_ydata())) for line in axis.get_lines()]
        for axis in figure.axes
        if axis.get_visible()
    }


def test_run_curves_gain_the_validation_answers_figures(runs):
    import matplotlib.pyplot as plt

    panels = visible_panels(plots.plot_run(plots.load_run(runs["scored"])))
    assert panels["ROUGE-L F1 of greedy answers"] == [("validation", [0.1, 0.2, 0.3])]
    assert panels["teacher NLL per token of greedy answers"] == [("validation", [4.0, 3.0, 2.5])]
    assert len(panels) == 5  # total loss, KD and CE terms above them
    plain = visible_panels(plots.plot_run(plots.load_run(runs["scored-plain"])))
    assert set(plain) == {"CE term (student next-token loss)", "ROUGE-L F1 of greedy answers"}  # no teacher NLL
    for name in ("older", "unscored"):
        assert set(visible_panels(plots.plot_run(plots.load_run(runs[name])))) == {
            "total loss",
            "KD term",
            "CE term (student next-token loss)",
        }
    plt.close("all")
    assert plots.write_run_curves(runs["scored"]).read_bytes().startswith(PNG_SIGNATURE)


def test_the_comparison_gains_the_answers_figures_of_the_runs_that_have_them(runs):
    import matplotlib.pyplot as plt

    compared = [plots.load_run(runs[name]) for name in ("scored", "scored-plain", "older")]
    panels = visible_panels(plots.plot_comparison(compared))
    assert panels["validation ROUGE-L F1 of greedy answers"] == [
        ("scored (DistillationLoss)", [0.1, 0.2, 0.3]),
        ("scored-plain (ClassicLoss)", [0.05, 0.1, 0.15]),
    ]
    assert panels["validation teacher NLL per token of greedy answers"] == [
        ("scored (DistillationLoss)", [4.0, 3.0, 2.5])
    ]
    before = visible_panels(plots.plot_comparison(compared[2:]))
    assert set(before) == {"validation perplexity", "training CE"}
    plt.close("all")
    rows = {row["run"]: row for row in plots.summary_rows(compared)}
    assert rows["scored"]["test ROUGE-L F1"] == 0.25 and rows["scored-plain"]["test teacher NLL per token"] is None
    assert rows["scored"]["test prompts answered"] == 5 and "test ROUGE-L F1" not in rows["older"]


# ---------------------------------------------------------------- the end of --plain-baseline


def test_the_baseline_comparison_puts_both_runs_side_by_side(runs):
    rows, figure = baseline_comparison.report(runs["scored"], runs["scored-plain"])
    teacher = baseline_comparison.TEACHER_COLUMN
    assert rows == [
        {"figure": "test perplexity", "scored": 4.5, "scored-plain": 4.5, teacher: 2.5},
        {"figure": "test ROUGE-L F1", "scored": 0.25, "scored-plain": 0.125, teacher: None},
        {"figure": "test teacher NLL per answer token", "scored": 2.75, "scored-plain": None, teacher: None},
        {"figure": "test answer length (new tokens)", "scored": 12.5, "scored-plain": 18.0, teacher: None},
        {"figure": "test answers ending in EOS", "scored": 0.8, "scored-plain": 0.4, teacher: None},
        {"figure": "test prompts answered", "scored": 5, "scored-plain": 5, teacher: None},
    ]
    assert figure == runs["scored"] / plots.COMPARISON_FILE and figure.read_bytes().startswith(PNG_SIGNATURE)
    text = baseline_comparison.table_text(rows, ["scored", "scored-plain"]).splitlines()
    assert text[0].split() == ["scored", "scored-plain", "teacher"] and text[3].split()[-3:] == ["2.75", "-", "-"]


def test_the_baseline_comparison_of_runs_without_figures_is_their_perplexities(runs, tmp_path):
    """A run made before the generation figures, and a baseline whose summary.json lacks every figure (`{}`): the
    table keeps the test perplexity row, `-` where it is missing, and nothing fails."""
    import shutil

    emptied = shutil.copytree(runs["scored-plain"], tmp_path / "emptied", ignore=shutil.ignore_patterns("best"))
    (emptied / "summary.json").write_text("{}")
    rows, figure = baseline_comparison.report(runs["older"], emptied)
    assert rows == [{"figure": "test perplexity", "older": 4.5, "emptied": None, "teacher": 2.5}]
    assert figure.read_bytes().startswith(PNG_SIGNATURE)
    # generation_prompts 0: its figures are null, and no row of them is shown (not even the 0 prompts answered).
    assert baseline_comparison.side_by_side([plots.load_run(runs[name]) for name in ("unscored", "older")]) == [
        {"figure": "test perplexity", "unscored": 4.5, "older": 4.5, "teacher": 2.5}
    ]
