"""Run distill.main, but crash this very process at a chosen point: the crash tests' stand-in for a real crash.

    python3 -m tests.crash_runner POINT STEP distill-arguments...

POINT is where the process dies, with SIGKILL (no handler, no cleanup: what an OOM killer or a lost node does):
- `step`: as the optimizer step after STEP begins;
- `staging`: while the checkpoint of STEP is half written (weights written, training state not yet);
- `swap`: between the two renames that put the checkpoint of STEP in place.
Two points hold processes together, for the tests of concurrent runs:
- `hold`: as the step after STEP begins, create the file $HELD and wait until the file $RELEASE exists;
- `together`: before choosing its run directory, wait until STEP processes have reached that point (files in the
  folder $BARRIER), then until the start of the next second, so that they all take the same timestamp.
Two points hold a process in its setup, where a test sends it a signal (STEP is not used): create the file $HELD and
wait until the file $RELEASE exists,
- `tokenizing`: as the data's first batch is tokenized;
- `teacher_cache`: once the teacher's cache has written its first split into its staging folder.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import distill
from distillation.training.trainer import Trainer

saving_step = {"value": None}


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def hold() -> None:
    Path(os.environ["HELD"]).touch()
    deadline = time.time() + 300  # a test that never releases it does not leave it behind for ever
    while not Path(os.environ["RELEASE"]).exists() and time.time() < deadline:
        time.sleep(0.05)


def hold_after_first_call(module, name: str) -> None:
    """Replace `module.name` by a function that, after its first call, holds the process (`hold`)."""
    original, calls = getattr(module, name), []

    def call_then_hold(*args, **kwargs):
        result = original(*args, **kwargs)
        if not calls:
            calls.append(1)
            hold()
        return result

    setattr(module, name, call_then_hold)


def main() -> int:
    point, step, arguments = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    optimizer_step, save = Trainer.step, Trainer.save

    def step_then_crash(self, step_batches, step_targets):
        if self.state.global_step == step:
            if point == "step":
                die()
            if point == "hold":
                hold()
        return optimizer_step(self, step_batches, step_targets)

    def save_noting_step(self, directory):
        saving_step["value"] = (self.state.global_step, directory.name)
        return save(self, directory)

    Trainer.step = step_then_crash
    Trainer.save = save_noting_step
    at_target = lambda: saving_step["value"] == (step, "last")  # noqa: E731

    if point == "staging":
        import torch

        torch_save = torch.save

        def save_then_crash(payload, path, *args, **kwargs):
            if at_target() and Path(getattr(path, "name", path)).name == "training_state.pt":  # a path or a file
                die()
            return torch_save(payload, path, *args, **kwargs)

        torch.save = save_then_crash
    if point == "swap":
        replace = os.replace

        def replace_then_crash(source, destination):
            replace(source, destination)
            if at_target() and Path(destination).name.endswith(".previous"):
                die()

        os.replace = replace_then_crash
    if point == "together":
        locate_run = distill.locate_run

        def locate_run_together(*args, **kwargs):
            barrier = Path(os.environ["BARRIER"])
            (barrier / str(os.getpid())).touch()
            while len(list(barrier.iterdir())) < step:
                time.sleep(0.01)
            time.sleep(1.02 - time.time() % 1)
            return locate_run(*args, **kwargs)

        distill.locate_run = locate_run_together
    if point == "tokenizing":
        import dataset

        hold_after_first_call(dataset, "_tokenize_with_prompt_lengths")
    if point == "teacher_cache":
        from distillation.training import teacher_cache

        hold_after_first_call(teacher_cache, "_build_split")
    return distill.main(arguments)


if __name__ == "__main__":
    sys.exit(main())
