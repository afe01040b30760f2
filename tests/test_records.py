"""Experiment records: metrics.jsonl and summary.json fields, TensorBoard events, plots, the plain baseline, and
both notebooks executed top to bottom against runs made here."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dataset
import distill
from distillation.run import plots
from distillation.training.trainer import Trainer
from helpers import REPO, base_config, read_metrics, write_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tensorboard_scalars(run_directory: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_directory / "tensorboard"), purge_orphaned_data=True)
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


@pytest.fixture(scope="module")
def compared_runs(tmp_path_factory, teacher_dir, data_file):
    """A distilled run and its plain baseline (--plain-baseline), shared by the read-only tests below."""
    root = tmp_path_factory.mktemp("records")
    values = base_config(root, teacher_dir, data_file)
    values["training_parameters"].update(eval_every_steps=6)
    config_file = write_config(root / "config.yaml", values)
    assert distill.main(["--config", str(config_file), "--run-name", "demo", "--plain-baseline"]) == 0
    return root, config_file, root / "checkpoints" / "demo", root / "checkpoints" / "demo-plain"


def test_training_records_carry_every_documented_field(compared_runs):
    _, _, distilled, _ = compared_runs
    records = read_metrics(distilled)
    training = [record for record in records if record["split"] == "train"]
    assert [record["step"] for record in training] == list(range(2, 25, 2))  # log_every_steps 2, 24 steps
    for record in training:
        for key in (
            "epoch",
            "samples_seen",
            "tokens_seen",
            "loss",
            "kd",
            "ce",
            "perplexity",
            "learning_rate",
            "tokens_per_s",
            "peak_memory_mib",
            "wall_time_s",
        ):
            assert record[key] is not None, key
        assert record["perplexity"] == pytest.approx(math.exp(record["ce"]))
        assert record["peak_memory_mib"] > 10  # a Python process with torch loaded
    assert [record["samples_seen"] for record in training] == sorted(record["samples_seen"] for record in training)
    wall_times = [record["wall_time_s"] for record in records]
    assert wall_times == sorted(wall_times)
    validations = [record for record in records if record["split"] == "validation"]
    assert [record["step"] for record in validations] == [6, 12, 18, 24]


def test_summary_has_best_test_and_teacher_figures(compared_runs, teacher_dir):
    _, config_file, distilled, _ = compared_runs
    summary = json.loads((distilled / "summary.json").read_text())
    validations = [record for record in read_metrics(distilled) if record["split"] == "validation"]
    best = min(validations, key=lambda record: record["loss"])
    assert summary["best_step"] == best["step"]
    assert summary["best_validation_perplexity"] == pytest.approx(best["perplexity"])
    assert summary["test"]["perplexity"] == pytest.approx(math.exp(summary["test"]["ce"]))
    assert summary["wall_time_s"] > 0

    # The teacher's test perplexity, recomputed here from its own definition: exp of the mean CE over real targets.
    from transformers import AutoModelForCausalLM

    import models
    from distillation.settings.config import load_config

    config = load_config(config_file)
    tokenizer = models.load_tokenizer(str(teacher_dir))
    splits = dataset.prepare_splits(
        dataset.spec_from_config(config), tokenizer, config.paths.data_folder, config.paths.token_dataset
    )
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    student = AutoModelForCausalLM.from_pretrained(distilled / "best").eval()
    total, count, kl_total, agreements = 0.0, 0, 0.0, 0
    for sample in splits["test"]:
        ids = torch.tensor([sample["input_ids"]])
        with torch.no_grad():
            log_probs = torch.log_softmax(teacher(ids).logits[0, :-1].double(), dim=-1)
            student_log_probs = torch.log_softmax(student(ids).logits[0, :-1].double(), dim=-1)
        total -= log_probs.gather(1, ids[0, 1:, None]).sum().item()
        count += ids.size(1) - 1
        kl_total += (log_probs.exp() * (log_probs - student_log_probs)).sum().item()
        agreements += (log_probs.argmax(-1) == student_log_probs.argmax(-1)).sum().item()
    assert summary["teacher"]["test"]["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
    assert summary["teacher"]["validation"]["perplexity"] > 1.0
    # How close the best student is to the teacher on the test split: KL at T = 1 and top-1 agreement.
    assert summary["test"]["kl_teacher"] == pytest.approx(kl_total / count, rel=1e-4)
    assert summary["test"]["top1_agreement"] == pytest.approx(agreements / count, abs=1.5 / count)
    assert summary["best_metric"] == "loss"


@pytest.mark.parametrize("best_metric, expected_best_step", [("loss", 4), ("perplexity", 12)])
def test_the_best_checkpoint_follows_the_chosen_metric(
    tmp_path, teacher_dir, data_file, monkeypatch, best_metric, expected_best_step
):
    """Validation results in which the loss only gets worse and the perplexity only better: each metric picks its
    own best step, and the best checkpoint and summary follow it."""
    evaluate = Trainer.evaluate

    def diverging(trainer, split):
        result = evaluate(trainer, split)
        if split == "validation":
            step = trainer.state.global_step
            result.update(loss=float(step), perplexity=1000.0 - step)
        return result

    monkeypatch.setattr(Trainer, "evaluate", diverging)
    values = base_config(tmp_path, teacher_dir, data_file)
    values["training_parameters"].update(eval_every_steps=4, max_steps=12, best_metric=best_metric)
    config_file = write_config(tmp_path / "config.yaml", values)
    assert distill.main(["--config", str(config_file), "--run-name", "best"]) == 0
    run = tmp_path / "checkpoints" / "best"
    validations = [record for record in read_metrics(run) if record["split"] == "validation"]
    assert [record["step"] for record in validations] == [4, 8, 12]
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["best_metric"], summary["best_step"]) == (best_metric, expected_best_step)
    assert summary["best_validation_perplexity"] == 1000.0 - expected_best_step
    assert json.loads((run / "best" / "trainer_state.json").read_text())["global_step"] == expected_best_step


def test_plain_baseline_trains_the_same_student_without_the_teacher(compared_runs):
    _, _, distilled, plain = compared_runs
    plain_summary = json.loads((plain / "summary.json").read_text())
    distilled_summary = json.loads((distilled / "summary.json").read_text())
    assert plain_summary["steps"] == distilled_summary["steps"]
    assert plain_summary["samples_seen"] == distilled_summary["samples_seen"]
    assert plain_summary["teacher"] is None and plain_summary["test"]["kd"] is None
    assert "ClassicLoss" in (plain / "config.yaml").read_text()
    assert all(record["kd"] is None for record in read_metrics(plain))


def test_tensorboard_events_hold_the_same_numbers_as_metrics_jsonl(compared_runs):
    _, _, distilled, _ = compared_runs
    training = [record for record in read_metrics(distilled) if record["split"] == "train"]
    scalars = tensorboard_scalars(distilled, "train/loss")
    assert [step for step, _ in scalars] == [record["step"] for record in training]
    assert [value for _, value in scalars] == pytest.approx([record["loss"] for record in training], rel=1e-6)
    assert [step for step, _ in tensorboard_scalars(distilled, "validation/perplexity")] == [6, 12, 18, 24]


def test_a_resumed_run_appends_records_without_duplicates_or_gaps(tmp_path, teacher_dir, data_file):
    values = base_config(tmp_path, teacher_dir, data_file)
    values["training_parameters"].update(
        max_steps=8, log_every_steps=1, checkpoint_every_steps=4, keep_step_checkpoints=2, eval_every_steps=100
    )
    config_file = write_config(tmp_path / "config.yaml", values)
    assert distill.main(["--config", str(config_file), "--run-name", "run"]) == 0
    run = tmp_path / "checkpoints" / "run"
    # As if the process had died right after step 8's records but before its checkpoint: back to step 4.
    shutil.rmtree(run / "last")
    shutil.copytree(run / "step-00000004", run / "last")
    assert (
        distill.main(
            ["--config", str(config_file), "--run-name", "run", "--resume", "--set", "training_parameters.max_steps=10"]
        )
        == 0
    )
    training_steps = [record["step"] for record in read_metrics(run) if record["split"] == "train"]
    assert training_steps == list(range(1, 11))
    assert [step for step, _ in tensorboard_scalars(run, "train/loss")] == list(range(1, 11))
    assert json.loads((run / "summary.json").read_text())["steps"] == 10


def test_distill_draws_the_run_curves(compared_runs):
    _, _, distilled, plain = compared_runs
    for run in (distilled, plain):
        assert (run / plots.CURVES_FILE).read_bytes().startswith(PNG_SIGNATURE)
    # --plain-baseline, once both runs are complete: their comparison, in the distilled run's directory.
    assert (distilled / plots.COMPARISON_FILE).read_bytes().startswith(PNG_SIGNATURE)
    assert not (plain / plots.COMPARISON_FILE).exists()


def test_plots_command_writes_each_run_and_a_comparison(compared_runs, tmp_path):
    _, _, distilled, plain = compared_runs
    for run in (distilled, plain):
        (run / plots.CURVES_FILE).unlink()
    output = tmp_path / "side_by_side.png"
    completed = subprocess.run(
        [sys.executable, "-m", "distillation.run.plots", str(distilled), str(plain), "--output", str(output)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    for path in (distilled / plots.CURVES_FILE, plain / plots.CURVES_FILE, output):
        assert path.read_bytes().startswith(PNG_SIGNATURE), path
        assert str(path) in completed.stdout


def test_plots_command_refuses_a_directory_that_is_not_a_run(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "distillation.run.plots", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 2
    assert "has no metrics.jsonl" in completed.stderr and "Traceback" not in completed.stderr


def test_summary_rows_compare_the_runs(compared_runs):
    _, _, distilled, plain = compared_runs
    rows = {row["run"]: row for row in plots.summary_rows([plots.load_run(distilled), plots.load_run(plain)])}
    assert rows["demo"]["loss"] == "DistillationLoss" and rows["demo-plain"]["loss"] == "ClassicLoss"
    assert rows["demo"]["teacher test perplexity"] > 1.0 and rows["demo-plain"]["teacher test perplexity"] is None
    assert 0 < rows["demo"]["test top-1 agreement"] <= 1 and rows["demo-plain"]["test KL to teacher"] is None
    assert (
        rows["demo"]["best validation perplexity"]
        == json.loads((distilled / "summary.json").read_text())["best_validation_perplexity"]
    )


def test_latest_runs_picks_the_newest_run_of_each_loss(compared_runs):
    root, _, distilled, plain = compared_runs
    assert plots.latest_runs(root / "checkpoints", "demo") == [distilled, plain]
    assert plots.latest_runs(root / "checkpoints", "nothing-here") == []


# ---------------------------------------------------------------- notebooks


def execute_notebook(name: str, first_cell: str):
    """Run a notebook from the repository root, its first code cell replaced, and return it with its outputs."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(REPO / name, as_version=4)
    parameters = next(cell for cell in notebook.cells if cell.cell_type == "code")
    parameters.source = first_cell
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(REPO)}},
    )
    environment = {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }
    previous = {key: os.environ.get(key) for key in environment}
    os.environ.update(environment)
    try:
        client.execute()
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return notebook


def figures_by_cell(notebook) -> list[int]:
    """The number of PNG images that each cell tagged `figure` displayed."""
    return [
        sum("image/png" in output.get("data", {}) for output in cell.outputs)
        for cell in notebook.cells
        if "figure" in cell.metadata.get("tags", [])
    ]


def notebook_outputs(notebook) -> tuple[str, list[str]]:
    """The printed text of a notebook's code cells, and the HTML tables they displayed."""
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    printed = "".join(output.get("text", "") for output in outputs)
    return printed, [output["data"]["text/html"] for output in outputs if "text/html" in output.get("data", {})]


def test_data_exploration_notebook_runs_and_draws_every_figure(compared_runs):
    _, config_file, _, _ = compared_runs
    notebook = execute_notebook("data_exploration.ipynb", f"CONFIG = {str(config_file)!r}")
    counts = figures_by_cell(notebook)
    assert len(counts) == 4 and all(count == 1 for count in counts), counts
    printed, tables = notebook_outputs(notebook)
    assert "### Instruction:" in printed  # the formatted examples
    assert any("share kept by the mask" in table for table in tables)
    top_k = next(table for table in tables if "mean top-k mass" in table)
    assert "<th>1</th>" in top_k and "<th>10</th>" in top_k


def test_experiments_notebook_compares_the_runs_and_generates(compared_runs, tmp_path):
    """With a third run, damaged by hand (records without their split, a summary.json that is a list, no best
    checkpoint), and a directory that is not a run, which before ended the notebook in a KeyError and a
    FileNotFoundError: what they cannot give is left out and named. A fourth run has generation figures (ROUGE-L
    of greedy answers...) in its validation and test records: the summary table shows them."""
    _, _, distilled, plain = compared_runs
    damaged = damaged_copy(distilled, tmp_path / "damaged", "[]", b"seed: [1\n")
    scored = scored_copy(distilled, tmp_path / "scored")
    notebook = execute_notebook(
        "experiments_exploration.ipynb",
        f"RUNS = [{str(distilled)!r}, {str(plain)!r}, {str(damaged)!r}, {str(scored)!r}, {str(tmp_path)!r}]\n"
        "CHECKPOINTS, DEMO_PREFIX = 'checkpoints', 'tiny'\n"
        "PROMPTS = [{'instruction': 'Add the two numbers.', 'input': '3 and 4'}]\nMAX_NEW_TOKENS = 8",
    )
    # One figure per run, the comparison, then kl_teacher and top1_agreement (the distilled runs have them).
    assert figures_by_cell(notebook) == [4, 1, 1]
    printed, tables = notebook_outputs(notebook)
    assert any("demo-plain" in table and "ClassicLoss" in table for table in tables)
    summary_table = next(table for table in tables if "test perplexity" in table)
    assert "test ROUGE-L F1" in summary_table and "test teacher NLL per token" in summary_table
    assert "--- demo:" in printed and "--- demo-plain:" in printed
    assert f"note: {damaged / 'summary.json'} holds a list" in printed and "4 of its records left out" in printed
    assert f"note: damaged has no best checkpoint in {damaged / 'best'}" in printed
    assert f"note: {tmp_path} has no metrics.jsonl" in printed  # not a run: named and left out
    # samples.jsonl side by side: a table per prompt, a column per run, the teacher's row once.
    sample_tables = [table for table in tables if ">teacher<" in table]
    assert len(sample_tables) == 3 and "=== prompt 2:" in printed
    assert all(">demo<" in table and ">demo-plain<" in table and ">24<" in table for table in sample_tables)


def test_experiments_notebook_without_runs_says_so(tmp_path):
    (tmp_path / "tiny-not-a-run").mkdir()  # a finished run's summary.json, but no metrics.jsonl: passed over
    (tmp_path / "tiny-not-a-run" / "summary.json").write_text("{}")
    notebook = execute_notebook(
        "experiments_exploration.ipynb",
        f"RUNS = []\nCHECKPOINTS, DEMO_PREFIX = {str(tmp_path)!r}, 'tiny'\nPROMPTS = []\nMAX_NEW_TOKENS = 8",
    )
    printed, _ = notebook_outputs(notebook)
    assert "No finished run under" in printed and figures_by_cell(notebook) == [0, 0, 0]


def test_data_exploration_notebook_runs_on_chat_data(tmp_path, teacher_dir, rows, tokenizer):
    """Before, the notebook read Alpaca prompt and response texts, which chat data does not have (KeyError)."""
    conversations = [
        {"messages": [{"role": "user", "content": row["instruction"]}, {"role": "assistant", "content": row["output"]}]}
        for row in rows[:60]
    ]
    chat_file = tmp_path / "chat.jsonl"
    chat_file.write_text("".join(json.dumps(conversation) + "\n" for conversation in conversations))
    config_file = write_config(tmp_path / "chat.yaml", base_config(tmp_path, teacher_dir, chat_file))
    notebook = execute_notebook("data_exploration.ipynb", f"CONFIG = {str(config_file)!r}")
    assert figures_by_cell(notebook) == [1, 1, 1, 1]
    printed, _ = notebook_outputs(notebook)
    # The samples as training renders the conversations: the Alpaca chat template, each answer ended by EOS.
    assert printed.count("### Instruction:") >= 3 and printed.count(f"{tokenizer.eos_token}\n") >= 3


@pytest.mark.parametrize("name, figures", [("data_exploration.ipynb", 4), ("experiments_exploration.ipynb", 4)])
def test_committed_notebooks_show_their_outputs(name, figures):
    """The notebooks are committed run (on the demo), so a reader sees the figures and tables without running them;
    small, and without this machine's paths."""
    import nbformat

    text = (REPO / name).read_text()
    assert len(text) < 600_000
    notebook = nbformat.reads(text, as_version=4)
    assert sum(figures_by_cell(notebook)) >= figures and all(figures_by_cell(notebook)), figures_by_cell(notebook)
    assert not any(
        output.get("output_type") == "error"
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )
    assert str(REPO) not in text and "/tmp/" not in text and "site-packages" not in text
    printed, tables = notebook_outputs(notebook)
    if name == "experiments_exploration.ipynb":
        assert any(">teacher<" in table for table in tables) and "=== reference:" in printed
    else:
        assert any("mean top-k mass" in table for table in tables)


def test_report_to_wandb_logs_through_accelerate(tmp_path, teacher_dir, data_file, monkeypatch):
    """wandb is not a dependency: a stand-in module records what the W&B tracker is given."""
    import importlib.machinery
    import types

    class StandInRun:
        def __init__(self, **settings):
            self.settings, self.logged, self.finished = settings, [], False

        def log(self, values, step=None):
            self.logged.append((step, dict(values)))

        def finish(self):
            self.finished = True

    runs, stored_config = [], {}
    wandb = types.ModuleType("wandb")
    wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    wandb.init = lambda **settings: runs.append(StandInRun(**settings)) or runs[-1]
    wandb.config = types.SimpleNamespace(update=lambda values, allow_val_change=False: stored_config.update(values))
    monkeypatch.setitem(sys.modules, "wandb", wandb)

    values = base_config(tmp_path, teacher_dir, data_file)
    values["training_parameters"].update(max_steps=4, report_to="wandb")
    config_file = write_config(tmp_path / "config.yaml", values)
    assert distill.main(["--config", str(config_file), "--run-name", "tracked"]) == 0
    (run,) = runs
    assert run.settings["project"] == "test" and run.settings["name"] == "tracked" and run.finished
    assert stored_config["training_parameters.learning_rate"] == pytest.approx(3e-3)
    logged_losses = [(step, values["train/loss"]) for step, values in run.logged if "train/loss" in values]
    training = [r for r in read_metrics(tmp_path / "checkpoints" / "tracked") if r["split"] == "train"]
    assert logged_losses == [(record["step"], record["loss"]) for record in training]
    assert not (tmp_path / "checkpoints" / "tracked" / "tensorboard").exists()  # only the trackers asked for


# ---------------------------------------------------------------- damaged records


def damaged_copy(run: Path, destination: Path, summary: str, config: bytes) -> Path:
    """A copy of a finished run whose records were damaged by hand: metrics records without their split or
    samples_seen, or with them (or a figure) of another type; summary.json and config.yaml replaced."""
    shutil.copytree(run, destination, ignore=shutil.ignore_patterns("last", "best", "step-*", "tensorboard"))
    damaged = [
        {"split": "train", "step": 26, "loss": 1.0},  # no samples_seen
        {"step": 26, "samples_seen": 999, "loss": 1.0},  # no split
        {"split": "validation", "step": "26", "samples_seen": 208, "perplexity": 3.0},
        {"split": "train", "step": 26, "samples_seen": "many", "ce": 1.0},
        # Usable, with some of their figures missing or damaged: drawn without them.
        {"split": "validation", "step": 26, "samples_seen": 208, "kl_teacher": 0.5, "perplexity": "high"},
        {"split": "train", "step": 26, "samples_seen": 208, "ce": 1.0, "tokens_per_s": "fast"},
    ]
    with (destination / "metrics.jsonl").open("a") as metrics:
        metrics.write("".join(json.dumps(record) + "\n" for record in damaged))
    (destination / "summary.json").write_text(summary)
    (destination / "config.yaml").write_bytes(config)
    return destination


def scored_copy(run: Path, destination: Path) -> Path:
    """A copy of a finished run (without its checkpoints and samples) whose validation and test records, and
    summary.json's test, hold generation figures, as a run with generation_prompts > 0 writes them."""
    shutil.copytree(
        run, destination, ignore=shutil.ignore_patterns("last", "best", "step-*", "tensorboard", "samples*")
    )
    figures = {"rouge_l": 0.25, "teacher_nll": 2.5, "response_length": 12.0, "eos_share": 0.75, "generation_prompts": 4}
    scored = [
        {**record, **figures} if record["split"] in ("validation", "test") else record for record in read_metrics(run)
    ]
    (destination / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in scored))
    summary = json.loads((run / "summary.json").read_text())
    summary["test"].update(figures)
    (destination / "summary.json").write_text(json.dumps(summary, indent=2))
    return destination


def test_plots_command_leaves_out_and_names_what_a_damaged_run_cannot_give(compared_runs, tmp_path, capsys):
    """Before, a record without split or samples_seen, a summary.json that is a list, a config.yaml that is not
    UTF-8 and an --output into a missing folder each ended the command in a traceback."""
    _, _, distilled, plain = compared_runs
    latin1 = "name: caf\xe9\n".encode("latin-1")
    listed = damaged_copy(distilled, tmp_path / "listed", "[1, 2]", latin1)
    emptied = damaged_copy(distilled, tmp_path / "emptied", "{}", b"seed: [1\n")
    output = tmp_path / "new" / "folder" / "side_by_side.png"
    assert plots.main([str(listed), str(plain), "--output", str(output)]) == 0
    printed = capsys.readouterr()
    notes = [line for line in printed.err.splitlines() if line.startswith("note: ")]
    assert notes == [
        f"note: {listed / 'metrics.jsonl'}: 4 of its records left out (not a JSON object, or without a text split, "
        "a whole step and a number samples_seen).",
        f"note: {listed / 'config.yaml'} is not UTF-8 text, so it is left out.",
        f"note: {listed / 'summary.json'} holds a list, not the mapping a run writes, so it is left out.",
    ]
    assert plots.load_run(emptied).problems[1:] == [
        f"{emptied / 'config.yaml'} cannot be read (while parsing a flow sequence), so it is left out"
    ]
    for path in (listed / plots.CURVES_FILE, output):
        assert path.read_bytes().startswith(PNG_SIGNATURE) and str(path) in printed.out
    rows = plots.summary_rows([plots.load_run(listed), plots.load_run(emptied)])
    assert [row["loss"] for row in rows] == ["?", "?"] and rows[1]["test perplexity"] is None
    assert rows[0]["tokens/s"] == plots.summary_rows([plots.load_run(distilled)])[0]["tokens/s"]


def test_plots_command_refuses_in_one_sentence_what_it_cannot_draw_or_write(compared_runs, tmp_path, capsys):
    _, _, distilled, plain = compared_runs
    empty_run = tmp_path / "empty-run"
    empty_run.mkdir()
    (empty_run / "metrics.jsonl").write_text('{"split": "train"}\n')
    assert plots.main([str(empty_run), "--output", str(tmp_path / "unused.png")]) == 0
    assert "has no usable record in metrics.jsonl" in capsys.readouterr().err
    assert not (empty_run / plots.CURVES_FILE).exists() and not (tmp_path / "unused.png").exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert plots.main([str(distilled), str(plain), "--output", str(blocker / "comparison.png")]) == 2
    (error,) = capsys.readouterr().err.splitlines()[-1:]
    assert error.startswith(f"error: cannot write the figure {blocker / 'comparison.png'} (it is a file); ")
