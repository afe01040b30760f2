"""Every file of a run directory damaged, missing or hostile, and every path a run writes to unusable: one sentence
that names the file and the fix that works, exit code 2, nothing of the run changed; or, where the damage can be
repaired without losing anything (a missing best checkpoint, a cut metrics record), a resume that completes.

(The files a run reads before its directory exists, config, data, caches and models, are in
test_damaged_inputs.py; a full disk is in test_full_disk.py.)"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_bad_inputs import tree_digest

import distill
from helpers import base_config, save_gpt2, trainer_state, write_config

GARBAGE = b"\x00\x93garbage\xff" * 50


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def into_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def optimizer_state_reshaped(path: Path) -> None:
    """The first parameter's optimizer state flattened: the file loads, and torch would fail only at the next step."""
    state = torch.load(path, weights_only=True)
    values = next(iter(state["optimizer"]["state"].values()))
    values["exp_avg"] = values["exp_avg"].reshape(-1)
    torch.save(state, path)


def hostile_state(**values):
    def damage(path: Path) -> None:
        path.write_text(json.dumps({**json.loads(path.read_text()), **values}))

    return damage


# (case id, file in the run directory, how it is damaged, the fragment the one sentence must contain)
REFUSED: list[tuple[str, str, Callable[[Path], None], str]] = [
    ("trainer state garbage", "last/trainer_state.json", lambda p: p.write_bytes(GARBAGE), "trainer_state.json"),
    ("trainer state empty", "last/trainer_state.json", lambda p: p.write_bytes(b""), "trainer_state.json"),
    ("trainer state truncated", "last/trainer_state.json", truncate, "trainer_state.json"),
    ("trainer state a list", "last/trainer_state.json", lambda p: p.write_text("[1, 2]"), "trainer_state.json"),
    ("trainer state a directory", "last/trainer_state.json", into_directory, "trainer_state.json"),
    ("negative step", "last/trainer_state.json", hostile_state(global_step=-5), "global_step"),
    ("step as text", "last/trainer_state.json", hostile_state(global_step="12"), "global_step"),
    ("best loss as text", "last/trainer_state.json", hostile_state(best_validation_loss="low"), "best_validation_loss"),
    ("unknown state key", "last/trainer_state.json", hostile_state(learning_rate=1.0), "learning_rate"),
    ("weights truncated", "last/model.safetensors", truncate, "model.safetensors"),
    ("weights missing", "last/model.safetensors", Path.unlink, "model.safetensors"),
    ("weights a directory", "last/model.safetensors", into_directory, "model.safetensors"),
    ("training state empty", "last/training_state.pt", lambda p: p.write_bytes(b""), "training_state.pt"),
    ("training state garbage", "last/training_state.pt", lambda p: p.write_bytes(GARBAGE), "training_state.pt"),
    ("training state missing", "last/training_state.pt", Path.unlink, "training_state.pt"),
    ("optimizer state of another shape", "last/training_state.pt", optimizer_state_reshaped, "exp_avg of shape"),
    ("best weights truncated", "best/model.safetensors", truncate, "best"),
    ("best state garbage", "best/trainer_state.json", lambda p: p.write_bytes(GARBAGE), "best"),
    ("lock file a directory", ".lock", into_directory, ".lock"),
]


@pytest.fixture(scope="module")
def earlier(tmp_path_factory, teacher_dir, data_file):
    """A run of 2 steps with a step copy; each case damages a copy of it and resumes that copy to 4 steps."""
    root = tmp_path_factory.mktemp("damaged-runs")
    values = base_config(root, teacher_dir, data_file)
    values["training_parameters"].update(
        max_steps=2, eval_every_steps=1, checkpoint_every_steps=1, keep_step_checkpoints=1
    )
    config_file = write_config(root / "config.yaml", values)
    assert distill.main(["--config", str(config_file), "--run-name", "earlier"]) == 0
    return root, config_file


def copy_of(earlier, name: str) -> Path:
    root, _ = earlier
    run = root / "checkpoints" / name
    shutil.copytree(root / "checkpoints" / "earlier", run)
    return run


def resume(earlier, name: str, *overrides: str) -> int:
    _, config_file = earlier
    arguments = ["--config", str(config_file), "--run-name", name, "--resume"]
    for override in ["training_parameters.max_steps=4", *overrides]:
        arguments += ["--set", override]
    return distill.main(arguments)


def run_digest(run: Path) -> dict:
    """Every file of the run but its lock (which names the process that last held it)."""
    return {name: digest for name, digest in tree_digest(run).items() if name != ".lock"}


def the_error(printed: str) -> str:
    errors = [line.split(" error: ", 1)[1] for line in printed.splitlines() if " error: " in line]
    assert len(errors) == 1, printed
    assert "Traceback" not in printed
    return errors[0]


@pytest.mark.parametrize("relative, damage, fragment", [case[1:] for case in REFUSED], ids=[c[0] for c in REFUSED])
def test_a_damaged_run_file_is_refused_with_one_sentence_and_nothing_changed(
    earlier, capsys, relative, damage, fragment
):
    run = copy_of(earlier, "case")
    try:
        damage(run / relative)
        before = run_digest(run)
        capsys.readouterr()
        assert resume(earlier, "case") == 2
        message = the_error(capsys.readouterr().err)
        assert fragment in message and "; " in message, message
        assert run_digest(run) == before
    finally:
        shutil.rmtree(run)


def written_before_identities(path: Path) -> None:
    """The trainer state of a checkpoint written before they recorded the teacher and the training settings."""
    state = json.loads(path.read_text())
    for part in ("teacher", "settings"):
        state["identity"].pop(part, None)
    path.write_text(json.dumps(state))


# (case id, how the run's checkpoint is changed first or None, --set overrides given another teacher, the fragment)
REFUSED_RESUMES: list[tuple[str, Callable[[Path], None] | None, Callable[[Path], list[str]], str]] = [
    ("another teacher", None, lambda teacher: [f"teacher.name={teacher}"], "another teacher"),
    ("adamw to sgd", None, lambda _: ["training_parameters.optimizer=sgd"], "training_parameters.optimizer 'adamw'"),
    (
        "adamw to sgd, an older checkpoint",
        written_before_identities,
        lambda _: ["training_parameters.optimizer=sgd"],
        "is not SGD's",
    ),
    (
        "another weight decay",
        None,
        lambda _: ["training_parameters.weight_decay=0.5"],
        "training_parameters.weight_decay",
    ),
    ("another schedule", None, lambda _: ["training_parameters.lr_scheduler=linear"], "lr_scheduler 'cosine'"),
]


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory, tokenizer) -> Path:
    """A teacher of the runs' shape and tokenizer, with other weights."""
    return save_gpt2(tmp_path_factory.mktemp("other-teacher"), tokenizer, nb_layers=2, seed=1)


@pytest.mark.parametrize(
    "change, overrides, fragment", [case[1:] for case in REFUSED_RESUMES], ids=[c[0] for c in REFUSED_RESUMES]
)
def test_a_resume_that_would_compute_another_run_is_refused_and_nothing_changed(
    earlier, other_teacher, capsys, change, overrides, fragment
):
    """What decides the updates after a resume (the teacher's files, the optimizer and its settings) is the
    checkpoint's, or the resume stops with one sentence before writing anything (config.resumed.yaml included)."""
    _, config_file = earlier
    run = copy_of(earlier, "refused")
    try:
        if change is not None:
            change(run / "last" / "trainer_state.json")
        before = run_digest(run)
        arguments = ["--config", str(config_file), "--run-name", run.name, "--resume"]
        for override in ["training_parameters.max_steps=4", *overrides(other_teacher)]:
            arguments += ["--set", override]
        capsys.readouterr()
        assert distill.main(arguments) == 2
        message = the_error(capsys.readouterr().err)
        assert fragment in message and "; " in message, message
        assert run_digest(run) == before
    finally:
        shutil.rmtree(run)


def test_a_resume_at_a_lower_learning_rate_continues_the_schedule_at_that_rate(earlier):
    """What a NaN loss asks for: the same run resumed at half the rate takes its next steps at half the rate the
    schedule gives there (not the checkpoint's rate, which loading its states alone would bring back)."""
    rates = {}
    every_step = "training_parameters.log_every_steps=1"
    for name, rate in (("same-rate", []), ("half-rate", ["training_parameters.learning_rate=0.0015"])):
        run = copy_of(earlier, name)
        try:
            assert resume(earlier, name, every_step, *rate) == 0
            records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            rates[name] = {r["step"]: r["learning_rate"] for r in records if r["split"] == "train" and r["step"] > 2}
        finally:
            shutil.rmtree(run)
    assert sorted(rates["same-rate"]) == [3, 4] and rates["same-rate"][3] > 0
    assert rates["half-rate"] == pytest.approx({step: rate / 2 for step, rate in rates["same-rate"].items()}, rel=1e-9)


def test_a_damaged_last_checkpoint_names_the_step_copy_to_put_back_and_that_works(earlier, capsys):
    run = copy_of(earlier, "no-last")
    truncate(run / "last" / "model.safetensors")
    capsys.readouterr()
    assert resume(earlier, "no-last") == 2
    message = the_error(capsys.readouterr().err)
    assert "cp -a" in message and "step-00000002" in message, message
    shutil.move(run / "last", run / "last.damaged")  # what the sentence says, done here
    shutil.copytree(run / "step-00000002", run / "last")
    assert resume(earlier, "no-last") == 0
    assert trainer_state(run / "last")["global_step"] == 4


def test_without_its_last_checkpoint_a_run_names_its_step_copies(earlier, capsys):
    run = copy_of(earlier, "last-gone")
    shutil.rmtree(run / "last")
    capsys.readouterr()
    assert resume(earlier, "last-gone") == 2
    message = the_error(capsys.readouterr().err)
    assert f"cp -a {run / 'step-00000002'} {run / 'last'}" in message, message


@pytest.mark.parametrize("steps", [4, 2])  # 2: the run is complete, and only the test is left to do
def test_a_missing_best_checkpoint_is_made_again_by_the_resume(earlier, steps):
    _, config_file = earlier
    run = copy_of(earlier, f"best-gone-{steps}")
    shutil.rmtree(run / "best")
    assert (
        distill.main(
            [
                "--config",
                str(config_file),
                "--run-name",
                run.name,
                "--resume",
                "--set",
                f"training_parameters.max_steps={steps}",
            ]
        )
        == 0
    )
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_step"] == steps and trainer_state(run / "best")["global_step"] == steps


def test_a_cut_or_damaged_metrics_record_does_not_stop_the_resume(earlier):
    run = copy_of(earlier, "metrics-cut")
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    damaged = [lines[0], "{not json", *lines[1:], lines[-1][:20]]  # a hand-edited line, and a cut last one
    metrics.write_text("\n".join(damaged))
    assert resume(earlier, "metrics-cut") == 0
    records = [json.loads(line) for line in metrics.read_text().splitlines()]  # every line a record again
    steps = [record["step"] for record in records if record["split"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 4


# Paths a run writes to that cannot be written: (case id, --set overrides from the root, the fragment)
UNWRITABLE: list[tuple[str, Callable[[Path], list[str]], str]] = [
    ("checkpoints folder a file", lambda root: [f"paths.checkpoints={file_at(root / 'a-file')}"], "a-file"),
    ("checkpoints folder under a file", lambda root: [f"paths.checkpoints={file_at(root / 'f') / 'sub'}"], "sub"),
    ("run name too long", lambda root: [], "x" * 300),
    ("data folder a file", lambda root: [f"paths.data_folder={file_at(root / 'd')}"], "paths.data_folder"),
    (
        "data folder under a file",
        lambda root: [f"paths.data_folder={file_at(root / 'g') / 'sub'}"],
        "paths.data_folder",
    ),
]


def file_at(path: Path) -> Path:
    path.write_text("a file, not a folder\n")
    return path


@pytest.mark.parametrize("overrides, fragment", [case[1:] for case in UNWRITABLE], ids=[c[0] for c in UNWRITABLE])
def test_an_unusable_output_path_is_one_sentence(earlier, tmp_path, capsys, overrides, fragment):
    _, config_file = earlier
    arguments = ["--config", str(config_file), "--run-name", "x" * 300 if "x" * 300 == fragment else "new"]
    for override in overrides(tmp_path):
        arguments += ["--set", override]
    capsys.readouterr()
    assert distill.main(arguments) == 2
    message = the_error(capsys.readouterr().err)
    assert fragment in message and "; " in message, message


@contextlib.contextmanager
def immutable(directory: Path):
    """The directory made immutable (chattr +i): the kernel refuses to create, change or remove anything in it,
    even for root, as on a read-only file system."""
    if subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available on this file system")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


def test_a_run_directory_that_cannot_be_written_is_one_sentence(earlier, capsys):
    run = copy_of(earlier, "unwritable")
    before = run_digest(run)
    with immutable(run):
        capsys.readouterr()
        assert resume(earlier, run.name) == 2
    message = the_error(capsys.readouterr().err)
    assert str(run) in message and "Operation not permitted" in message, message
    assert run_digest(run) == before


def test_a_checkpoints_folder_that_cannot_be_written_is_one_sentence(earlier, tmp_path, capsys):
    _, config_file = earlier
    with immutable(tmp_path):
        capsys.readouterr()
        assert (
            distill.main(["--config", str(config_file), "--run-name", "new", "--set", f"paths.checkpoints={tmp_path}"])
            == 2
        )
    message = the_error(capsys.readouterr().err)
    assert "Operation not permitted" in message and "paths.checkpoints" in message, message
    assert list(tmp_path.iterdir()) == []
