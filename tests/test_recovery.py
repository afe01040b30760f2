"""Crashes and stops: a run killed anywhere and resumed ends equal (to the last bit of float rounding) to the same
run done in one go."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import distill
from distillation.training.trainer import Trainer
from helpers import REPO, base_config, trainer_state, weights, write_config

RUNNER = ["-m", "tests.crash_runner"]  # run from the repository root, as a module


def run_process(*arguments: str, point: str = "none", step: int = -1) -> int:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(
        [sys.executable, *RUNNER, point, str(step), *arguments],
        cwd=REPO,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=300,
    )
    assert "Traceback" not in completed.stderr, completed.stderr[-3000:]
    return completed.returncode


def history(run_directory: Path) -> list[tuple]:
    """The metrics that must not depend on a crash: which step, which split, and the loss terms."""
    records = [json.loads(line) for line in (run_directory / "metrics.jsonl").read_text().splitlines()]
    return [(r["split"], r["step"], r["epoch"], r["samples_seen"], r["loss"], r["kd"], r["ce"]) for r in records]


def assert_same_history(resumed: list[tuple], straight: list[tuple]) -> None:
    """The same records (split, step, epoch, samples seen) exactly, and the same loss terms to 1e-5: the last-bit
    rounding that `assert_same_as_straight` tolerates in the weights moves a loss by about 5e-7 (seen once in CI, on
    a CPU whose kernels round differently in a new process), while another batch, learning rate or random state
    moves it by 1e-3 or more."""
    assert [record[:4] for record in resumed] == [record[:4] for record in straight]
    for resumed_record, straight_record in zip(resumed, straight):
        assert resumed_record[4:] == pytest.approx(straight_record[4:], rel=0, abs=1e-5), resumed_record[:2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, teacher_dir, data_file):
    """A config with step checkpoints every 5 of its 24 steps, and the reference run done in one go."""
    root = tmp_path_factory.mktemp("recovery")
    values = base_config(root, teacher_dir, data_file)
    values["training_parameters"]["checkpoint_every_steps"] = 5
    config_file = write_config(root / "config.yaml", values)
    assert run_process("--config", str(config_file), "--run-name", "straight") == 0
    return config_file, root / "checkpoints"


def without_key_biases(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """The attention keys' biases left out: adding the same vector to every key shifts all of a query's scores
    equally, which softmax ignores, so their gradient is rounding noise (about 1e-12 against 1e-2 for the values'
    biases) that Adam scales up to learning-rate-sized steps. A last-bit difference in a new process then moves
    them by up to about 1e-5 (seen in 3 of about 60 resumes), without any effect on what the model computes."""
    if not key.endswith("attn.c_attn.bias"):
        return tensor
    width = tensor.numel() // 3  # queries, keys, values
    return torch.cat([tensor[:width], tensor[2 * width :]])


def assert_same_as_straight(checkpoints: Path, name: str) -> None:
    expected, resumed = weights(checkpoints / "straight" / "last"), weights(checkpoints / name / "last")
    assert expected.keys() == resumed.keys()
    for key in expected:
        expected_tensor, resumed_tensor = without_key_biases(key, expected[key]), without_key_biases(key, resumed[key])
        # Bitwise in almost every run; CPU kernels may round a last bit differently in a new process, which 1e-6
        # tolerates while any resume mistake (another batch, learning rate or random state) moves the weights by
        # far more.
        difference = (expected_tensor - resumed_tensor).abs().max().item()
        assert difference <= 1e-6, f"{key} differs after the resume by {difference:.2e}"
    assert_same_history(history(checkpoints / name), history(checkpoints / "straight"))
    assert trainer_state(checkpoints / name / "last")["global_step"] == 24


@pytest.fixture(scope="module")
def killed_at_step_7(setup):
    """A run killed with SIGKILL two steps after its checkpoint of step 5; tests continue copies of it."""
    config_file, checkpoints = setup
    assert run_process("--config", str(config_file), "--run-name", "killed-7", point="step", step=7) == -signal.SIGKILL
    assert not (checkpoints / "killed-7" / "summary.json").exists()
    return checkpoints / "killed-7"


def copy_run(run: Path, name: str) -> Path:
    return Path(shutil.copytree(run, run.with_name(name)))


def resumed_from(run: Path) -> str:
    return (run / "train.log").read_text().rsplit("Resumed from", 1)[1].splitlines()[0]


def test_a_run_killed_again_and_again_resumes_to_the_same_weights(setup, killed_at_step_7):
    """SIGKILL at every kind of moment, one after the other, each resumed from the checkpoint it left."""
    config_file, checkpoints = setup
    run = copy_run(killed_at_step_7, "killed")
    kills = [
        ("staging", 15, 5),  # while the checkpoint of step 15 is half written (resuming from 5, the one step 7 left)
        ("swap", 20, 12),  # between the two renames that put the checkpoint of step 20 in place (from 12: epoch end)
        ("step", 22, 15),  # mid-epoch, two steps after a checkpoint (from 15: the swap's checkpoint put back)
    ]
    for point, step, expected_checkpoint_step in kills:
        status = run_process("--config", str(config_file), "--run-name", run.name, "--resume", point=point, step=step)
        assert status == -signal.SIGKILL, point
        assert f"step {expected_checkpoint_step}," in resumed_from(run), point
        assert not (run / "summary.json").exists()

    assert run_process("--config", str(config_file), "--run-name", run.name, "--resume") == 0
    assert "step 20," in resumed_from(run)
    assert_same_as_straight(checkpoints, run.name)
    leftovers = [path.name for path in run.iterdir() if path.name.startswith(".") and path.name != ".lock"]
    assert leftovers == []


def test_signals_finish_the_step_write_a_checkpoint_and_resume_to_the_same_weights(setup, monkeypatch):
    """Real SIGTERM and SIGINT, sent to this process as an optimizer step begins, in one run after the other."""
    config_file, checkpoints = setup
    name, at_step = "stopped", {"value": None}
    optimizer_step = Trainer.step

    def step_then_signal(self, step_batches, step_targets):
        if self.state.global_step == at_step["value"] and self.stop_signals.received is None:
            os.kill(os.getpid(), at_step["signal"])
        return optimizer_step(self, step_batches, step_targets)

    monkeypatch.setattr(Trainer, "step", step_then_signal)
    arguments = ["--config", str(config_file), "--run-name", name]
    for number, step, resume in ((signal.SIGTERM, 8, []), (signal.SIGINT, 16, ["--resume"])):
        at_step.update(value=step, signal=number)
        assert distill.main(arguments + resume) == 128 + number
        assert trainer_state(checkpoints / name / "last")["global_step"] == step + 1  # the step it was in, finished
    at_step["value"] = None
    assert distill.main(arguments + ["--resume"]) == 0
    assert_same_as_straight(checkpoints, name)


def test_step_checkpoints_are_pruned_but_last_and_best_kept(tmp_path, config_file):
    status = distill.main(
        [
            "--config",
            str(config_file),
            "--run-name",
            "pruned",
            "--set",
            "training_parameters.checkpoint_every_steps=3",
            "--set",
            "training_parameters.keep_step_checkpoints=2",
        ]
    )
    assert status == 0
    run = tmp_path / "checkpoints" / "pruned"
    assert sorted(path.name for path in run.glob("step-*")) == ["step-00000021", "step-00000024"]
    assert trainer_state(run / "step-00000021")["global_step"] == 21
    assert (run / "last").is_dir() and (run / "best").is_dir()


class PlantedPayload:
    """Unpickling this would run a shell command: a checkpoint must never do that."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_training_state_is_refused_without_running_it(tmp_path, config_file):
    assert (
        distill.main(["--config", str(config_file), "--run-name", "victim", "--set", "training_parameters.max_steps=2"])
        == 0
    )
    marker = tmp_path / "code-was-run"
    with open(tmp_path / "checkpoints" / "victim" / "last" / "training_state.pt", "wb") as handle:
        pickle.dump({"optimizer": PlantedPayload(marker)}, handle, protocol=2)
    status = distill.main(
        [
            "--config",
            str(config_file),
            "--run-name",
            "victim",
            "--resume",
            "--set",
            "training_parameters.max_steps=4",
        ]
    )
    assert status == 2
    assert not marker.exists()


def scaled_outputs(student, factor: float):
    """The student's outputs as the criterion reads them (logits, or hidden states for the fused loss) times
    `factor`."""
    name = "logits" if student.logits is not None else "hidden"
    return student._replace(**{name: getattr(student, name) * factor})


def test_nan_loss_stops_and_names_the_last_good_checkpoint(tmp_path, config_file, monkeypatch, caplog):
    original = Trainer.forward

    def poisoned(self, batch):
        student, teacher = original(self, batch)
        if self.networks.student.training and self.state.global_step >= 6:  # the student's outputs turn NaN
            return scaled_outputs(student, float("nan")), teacher
        return student, teacher

    monkeypatch.setattr(Trainer, "forward", poisoned)
    status = distill.main(
        [
            "--config",
            str(config_file),
            "--run-name",
            "nan",
            "--set",
            "training_parameters.checkpoint_every_steps=5",
        ]
    )
    assert status == distill.EXIT_NON_FINITE_LOSS
    last = tmp_path / "checkpoints" / "nan" / "last"
    assert trainer_state(last)["global_step"] == 5
    assert all(torch.isfinite(tensor).all() for tensor in weights(last).values())
    assert "step 5" in caplog.text and str(last) in caplog.text


def test_nan_loss_can_skip_the_batch(tmp_path, config_file, monkeypatch):
    original = Trainer.forward

    def poisoned(self, batch):
        student, teacher = original(self, batch)
        if self.networks.student.training and self.state.global_step in (3, 7):  # the student's outputs overflow
            return scaled_outputs(student, float("inf")), teacher
        return student, teacher

    monkeypatch.setattr(Trainer, "forward", poisoned)
    status = distill.main(
        [
            "--config",
            str(config_file),
            "--run-name",
            "skip",
            "--set",
            "training_parameters.on_nonfinite_loss=skip",
        ]
    )
    assert status == 0
    last = tmp_path / "checkpoints" / "skip" / "last"
    assert trainer_state(last)["skipped_batches"] == 2
    assert all(torch.isfinite(tensor).all() for tensor in weights(last).values())


def test_the_optimizer_state_is_saved_by_parameter_name_and_loads_back(tmp_path):
    """Checkpoints key the optimizer state by parameter name (so it moves between process counts and FSDP), and it
    loads back into the same state; a state keyed by index (PyTorch's own form, never written here) is refused in
    one sentence."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from distillation.run import checkpoints

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    decayed = [parameter for parameter in model.parameters() if parameter.dim() >= 2]
    kept = [parameter for parameter in model.parameters() if parameter.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decayed}, {"params": kept, "weight_decay": 0.0}], lr=1e-3)
    tokens = torch.randint(0, 50, (2, 8))
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()
    by_index = optimizer.state_dict()

    _, saved = checkpoints.gather_training_states(model, optimizer)
    assert set(saved["state"]) == {name for name, _ in model.named_parameters()}
    assert saved["param_groups"][1]["params"] == [
        name for name, parameter in model.named_parameters() if parameter.dim() < 2
    ]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def load(form) -> torch.optim.Optimizer:
        fresh = torch.optim.AdamW([{"params": decayed}, {"params": kept, "weight_decay": 0.0}], lr=1e-3)
        torch.save({"optimizer": form, "scheduler": scheduler.state_dict()}, tmp_path / checkpoints.TRAINING_STATE_FILE)
        checkpoints.load_training_state(tmp_path, model, fresh, torch.optim.lr_scheduler.LambdaLR(fresh, lambda s: 1))
        return fresh

    restored = load(saved).state_dict()
    assert restored["param_groups"] == by_index["param_groups"]
    for index, values in by_index["state"].items():
        for key, tensor in values.items():
            assert torch.equal(restored["state"][index][key], tensor), (index, key)
    with pytest.raises(checkpoints.CheckpointError, match="cannot be used") as refused:
        load(by_index)
    assert "\n" not in str(refused.value)


def test_pruning_step_copies_never_deletes_the_last_or_the_best_checkpoint(tmp_path, teacher_dir, data_file):
    """Checkpoint names that look like the step copies' (`step-...`) are still never pruned."""
    values = base_config(tmp_path, teacher_dir, data_file)
    values["training_parameters"].update(
        max_steps=6,
        checkpoint_every_steps=2,
        keep_step_checkpoints=1,
        eval_every_steps=2,
        checkpoints_name_last="step-last",
        checkpoints_name_best="step-best",
    )
    config_file = write_config(tmp_path / "config.yaml", values)
    assert distill.main(["--config", str(config_file), "--run-name", "named"]) == 0
    run = tmp_path / "checkpoints" / "named"
    assert sorted(path.name for path in run.glob("step-*")) == ["step-00000006", "step-best", "step-last"]
    assert trainer_state(run / "step-last")["global_step"] == 6
    summary = json.loads((run / "summary.json").read_text())
    assert trainer_state(run / "step-best")["global_step"] == summary["best_step"]


def signal_when_changed(path: Path, number: int, *arguments: str) -> subprocess.CompletedProcess:
    """Run distill.py and send it the real signal `number` the moment `path` changes on disk."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(
        [sys.executable, "distill.py", *arguments],
        cwd=REPO,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    before = path.stat()
    while process.poll() is None:
        now = path.stat() if path.exists() else None
        if now is None or (now.st_ino, now.st_size, now.st_mtime_ns) != (
            before.st_ino,
            before.st_size,
            before.st_mtime_ns,
        ):
            process.send_signal(number)
            break
        time.sleep(0.0002)
    _, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, None, stderr)


def test_a_signal_while_a_resume_rewrites_the_history_loses_none_of_it(setup, killed_at_step_7):
    """The resume drops the records after its checkpoint by rewriting metrics.jsonl; a real signal (SIGTERM, then
    SIGKILL), sent by this process the moment the file changes on disk, must leave the whole history up to the
    checkpoint, and the run must then resume to the same end as the straight one."""
    config_file, checkpoints = setup
    name = copy_run(killed_at_step_7, "history").name
    metrics = checkpoints / name / "metrics.jsonl"
    # A long history (a long run's worth of records before the checkpoint of step 5), so the rewrite takes a while.
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    old = [{**records[0], "loss": index / 1e5, "note": "x" * 100} for index in range(30_000)]
    metrics.write_text("".join(json.dumps(record) + "\n" for record in old + records))
    expected_history = old + [record for record in records if record["step"] <= 5]

    for number in (signal.SIGTERM, signal.SIGKILL):
        stopped = signal_when_changed(metrics, number, "--config", str(config_file), "--run-name", name, "--resume")
        assert stopped.returncode in (-number, 128 + number), stopped.stderr[-3000:]
        assert "Traceback" not in stopped.stderr
        kept = [json.loads(line) for line in metrics.read_text().splitlines()]
        assert kept[: len(expected_history)] == expected_history, signal.Signals(number).name

    assert run_process("--config", str(config_file), "--run-name", name, "--resume") == 0
    final = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert final[: len(old)] == old
    assert_same_history(history(checkpoints / name)[len(old) :], history(checkpoints / "straight"))


def start_process(*arguments: str, point: str = "none", step: int = -1, **environment: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *RUNNER, point, str(step), *arguments],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **environment},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_second_process_on_a_run_in_use_is_refused_and_the_run_ends_whole(setup, tmp_path):
    config_file, checkpoints = setup
    name = "in-use"
    held, release = tmp_path / "held", tmp_path / "release"
    first = start_process(
        "--config", str(config_file), "--run-name", name, point="hold", step=10, HELD=str(held), RELEASE=str(release)
    )
    try:
        while not held.exists():  # the first process is training, past its first checkpoint
            assert first.poll() is None, first.communicate()[1][-3000:]
            time.sleep(0.05)
        second = subprocess.run(
            [sys.executable, "distill.py", "--config", str(config_file), "--run-name", name, "--resume"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        assert second.returncode == 2, second.stderr[-3000:]
        errors = [line for line in second.stderr.splitlines() if " error: " in line]
        assert len(errors) == 1 and f"in use by another process (pid {first.pid})" in errors[0], second.stderr
    finally:
        release.touch()
    assert first.wait(timeout=300) == 0, first.communicate()[1][-3000:]
    assert_same_as_straight(checkpoints, name)


def test_runs_started_in_the_same_second_get_their_own_directories(setup, tmp_path):
    config_file, checkpoints = setup
    root = tmp_path / "checkpoints"
    arguments = (
        "--config",
        str(config_file),
        "--set",
        f"paths.checkpoints={root}",
        "--set",
        "training_parameters.max_steps=3",
    )
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    processes = [start_process(*arguments, point="together", step=2, BARRIER=str(barrier)) for _ in range(2)]
    for process in processes:
        assert process.wait(timeout=300) == 0, process.communicate()[1][-3000:]
    runs = sorted(path.name for path in root.iterdir())
    assert len(runs) == 2 and runs[1] == runs[0] + "-2", runs  # the same timestamp, and a suffix
    for run in runs:
        assert trainer_state(root / run / "last")["global_step"] == 3
        assert [record[0] for record in history(root / run)].count("test") == 1
        assert len(list((root / run).glob("config*.yaml"))) == 1
