"""A real full disk: a small tmpfs mounted in a private mount namespace (`unshare -rm`), filled with a file, and a
run that writes there. No mock: each writer (safetensors, torch.save, the config, the metrics) meets ENOSPC as the
kernel gives it. Skipped, with the reason, where the machine does not allow an unprivileged mount namespace."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import distill
from helpers import REPO, base_config, trainer_state, weights, write_config

MOUNT_SIZE_KIB = 4096
PAGE = 4096


def can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(
    not can_mount_tmpfs(), reason="needs `unshare -rm` (unprivileged user and mount namespaces) to mount a tmpfs"
)


def on_small_filesystem(mount: Path, script: str) -> subprocess.CompletedProcess:
    """Run the bash `script` with a fresh tmpfs of MOUNT_SIZE_KIB mounted at `mount`, seen by this script only."""
    mount.mkdir(parents=True, exist_ok=True)
    prelude = f"set -u\nmount -t tmpfs -o size={MOUNT_SIZE_KIB}k tmpfs {shlex.quote(str(mount))}\n"
    fill = textwrap.dedent("""
        fill_leaving() {  # fill the tmpfs so that only $1 KiB stay free
            local avail=$(df -k --output=avail "$MOUNT" | tail -1)
            fallocate -l $(( (avail - $1) * 1024 )) "$MOUNT/filler"
        }
    """)
    environment = {**os.environ, "MOUNT": str(mount), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        ["unshare", "-rm", "bash", "-c", prelude + fill + script],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )


def file_sizes(directory: Path) -> dict[str, int]:
    return {path.name: path.stat().st_size for path in directory.iterdir() if path.is_file()}


@pytest.fixture(scope="module")
def earlier(tmp_path_factory, teacher_dir, data_file):
    """A run of 2 steps (its data already tokenized), and the config that continues it on the small disk."""
    root = tmp_path_factory.mktemp("full-disk")
    values = base_config(root, teacher_dir, data_file)
    values["training_parameters"]["max_steps"] = 2
    assert distill.main(["--config", str(write_config(root / "config.yaml", values)), "--run-name", "run"]) == 0
    values["paths"]["checkpoints"] = str(root / "mount" / "checkpoints")
    values["training_parameters"]["max_steps"] = 4
    return root, write_config(root / "resume.yaml", values)


def kib(size: int) -> int:
    return -(-size // PAGE) * PAGE // 1024


@pytest.mark.slow
@pytest.mark.parametrize("where", ["config", "weights", "training state"])
def test_a_full_disk_stops_with_one_sentence_keeps_every_checkpoint_and_the_run_resumes(earlier, tmp_path, where):
    root, config_file = earlier
    run = root / "checkpoints" / "run"
    sizes = file_sizes(run / "last")
    small_files = sum(
        kib(size) for name, size in sizes.items() if name not in ("model.safetensors", "training_state.pt")
    )
    # Free space at which the checkpoint of step 4 fails while writing the file named by `where` (the config:
    # the first file the resume writes).
    free = {
        "config": 0,
        "weights": 8 + kib(sizes["model.safetensors"]) // 2,
        "training state": 8 + small_files + kib(sizes["model.safetensors"]) + kib(sizes["training_state.pt"]) // 2,
    }[where]
    mount, out = root / "mount", tmp_path / "out"
    resume = (
        f"{shlex.quote(sys.executable)} distill.py --config {shlex.quote(str(config_file))} --resume --run-name run"
    )
    result = on_small_filesystem(
        mount,
        f"""
        mkdir -p "$MOUNT/checkpoints" {shlex.quote(str(out))}
        cp -a {shlex.quote(str(run))} "$MOUNT/checkpoints/run"
        fill_leaving {free}
        {resume} 2> {shlex.quote(str(out / "full.err"))}; echo $? > {shlex.quote(str(out / "full.status"))}
        cp -a "$MOUNT/checkpoints/run" {shlex.quote(str(out / "after-full"))}
    """
        + (
            ""
            if where != "training state"
            else f"""
        rm "$MOUNT/filler"
        {resume} 2> {shlex.quote(str(out / "freed.err"))}; echo $? > {shlex.quote(str(out / "freed.status"))}
        cp -a "$MOUNT/checkpoints/run" {shlex.quote(str(out / "after-freed"))}
    """
        ),
    )
    assert result.returncode == 0, result.stderr

    stderr = (out / "full.err").read_text()
    assert (out / "full.status").read_text().strip() == "2", stderr[-3000:]
    assert "Traceback" not in stderr
    errors = [line.split(" error: ", 1)[1] for line in stderr.splitlines() if " error: " in line]
    assert len(errors) == 1 and "disk is full" in errors[0] and "--resume --run-name run" in errors[0], errors
    assert ("config.resumed.yaml" if where == "config" else "checkpoint") in errors[0]
    after_full = out / "after-full"
    for checkpoint in ("last", "best"):  # every checkpoint as it was, bit for bit
        before, after = weights(run / checkpoint), weights(after_full / checkpoint)
        assert all((before[key] == after[key]).all() for key in before)
        assert trainer_state(after_full / checkpoint) == trainer_state(run / checkpoint)
    leftovers = [path.name for path in after_full.iterdir() if path.name.startswith(".") and path.name != ".lock"]
    assert leftovers == []  # no staging folder keeps the space
    assert (after_full / "config.yaml").read_bytes() == (run / "config.yaml").read_bytes()
    lines = (after_full / "metrics.jsonl").read_text().splitlines()
    assert all(isinstance(json.loads(line), dict) for line in lines)  # no half record

    if where != "training state":  # the checkpoints are whole: resuming once, below, is enough
        return
    assert (out / "freed.status").read_text().strip() == "0", (out / "freed.err").read_text()[-3000:]
    resumed = out / "after-freed"
    assert trainer_state(resumed / "last")["global_step"] == 4
    records = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    train_steps = [record["step"] for record in records if record["split"] == "train"]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 4
    assert [record["split"] for record in records].count("test") == 1


def test_a_metrics_record_that_does_not_fit_leaves_no_half_line(tmp_path):
    """metrics.jsonl ends 10 bytes before a page boundary on a full disk: the next record fits only in part."""
    mount = tmp_path / "mount"
    program = textwrap.dedent(f"""
        import json, os
        from accelerate import Accelerator
        from distillation.run import records
        from distillation.run.checkpoints import TrainerState
        path = os.path.join({str(mount)!r}, "metrics.jsonl")
        first = json.dumps({{"split": "train", "step": 1, "pad": ""}})
        first = first[:-2] + "x" * ({PAGE} - 10 - len(first) - 1) + first[-2:]
        with open(path, "w") as handle:
            handle.write(first + "\\n")
        import subprocess; subprocess.run(["bash", "-c", "fill_leaving 0"], check=True)
        try:
            records.MetricsLog(__import__("pathlib").Path(path), Accelerator(cpu=True)).write(
                "train", {{"loss": 1.0, "padding": "y" * 300}}, TrainerState(global_step=2), 1.0)
        except OSError as error:
            print("errno", error.errno)
        print("size", os.path.getsize(path))
        print("lines", [json.loads(line)["step"] for line in open(path)])
    """)
    script = f"""
        export -f fill_leaving
        cd {shlex.quote(str(REPO))} && {shlex.quote(sys.executable)} -c {shlex.quote(program)}
    """
    result = on_small_filesystem(mount, script)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout.splitlines()
    assert "errno 28" in printed
    assert f"size {PAGE - 10}" in printed
    assert "lines [1]" in printed
