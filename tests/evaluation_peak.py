"""The peak memory that one validation or one training step of a run adds, in this process (a fresh one per
measurement: a process's peak only grows, and here it is reset once the run is set up):

    python3 -m tests.evaluation_peak CONFIG validation|step

prints the bytes by which the peak resident size rose above the resident size before the call. Linux only (it
resets and reads the peak through /proc/self)."""

from __future__ import annotations

import sys
from pathlib import Path

import distill
from distillation.settings.config import load_config


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} is not in /proc/self/status")


def main() -> int:
    config_file, call = Path(sys.argv[1]), sys.argv[2]
    trainer = distill.setup(load_config(config_file), call, False)
    batch = next(iter(trainer.batches.train_loader))
    Path("/proc/self/clear_refs").write_text("5")  # the peak resident size starts again from the current one
    before = _status("VmRSS:")
    if call == "validation":
        trainer.evaluate("validation")
    else:
        trainer.step([batch], batch["target_tokens"])
    print(_status("VmHWM:") - before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
