"""Training-step throughput of this project against a faithful re-creation of the original project's step, then at
GPT-2's real shapes against TRL's GKDTrainer (bench/real_shape.py). From the repository root:

    python3 -m bench.throughput            # about 10 minutes on 2 CPU cores
    python3 -m bench.throughput --quick    # about 4 minutes

Every step trains the same GPT-2-shaped student (random weights, width 512) against the same teacher, on the same
samples, whose lengths follow a distribution like Alpaca-GPT4's (log-normal, median about 200 tokens, cut at max
length), measured side by side in this one process:
- seed step: samples loaded from a JSON file of token lists, every sample padded to the max length, the fp32
  teacher, GPT-2's unfused GELU, and a full-vocabulary fp32 loss over every position, padding included;
- full logits: the Arrow-backed tokenized data, length-grouped batches padded to their longest sample, the teacher
  without autograd, the fused GELU, no KV cache, fused AdamW, and the full-logits KD + CE over real target tokens,
  in float32;
- fused loss: the same with the loss computed from hidden states a chunk at a time (loss.DistillationLoss as
  distill.py runs it);
- + bf16 (auto): the same in the precision `mixed_precision: auto` picks on this machine (bf16 autocast and a bf16
  teacher where the CPU has native bf16, else float32 again);
- + packing: the same with data.packing (rows of max length, block-diagonal attention).
Throughput counts real (non-padding) tokens only. The machine's matmul FLOP/s in float32 and bf16 is measured in the
same run, so that the matmul efficiency says what fraction of the machine's arithmetic in the row's precision a step
turns into model FLOPs (those of the real tokens, attending within their own sample). Separately, the peak memory of
the fused KD + CE loss is compared with the full-logits one at GPT-2's vocabulary (V = 50257) and T = 1024, in
float32. The last line is one JSON object with the figures of both parts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import models
from bench import real_shape, workload
from distillation.data import batching
from distillation.runtime import hardware
from loss import DistillationLoss, ModelOutput

REPO = Path(__file__).resolve().parent.parent
WIDTH = 512  # a mid-size student: 8 heads of 64, as in the larger GPT-2s


def as_project_builds_it(model):
    """The same weights in the model that models.py builds (its fused GELU kernel)."""
    from transformers import AutoModelForCausalLM

    config = models.with_fused_activation(model.config.__class__.from_dict(model.config.to_dict()))
    rebuilt = AutoModelForCausalLM.from_config(config)
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.train(model.training).requires_grad_(any(p.requires_grad for p in model.parameters()))
    return rebuilt


def seed_step(teacher, student, optimizer, batch_ids: list[list[int]], max_length: int, pad_id: int) -> float:
    """The original project's step: pad to max length, fp32 teacher with autograd bookkeeping off only by eval mode,
    full-vocabulary fp32 KD and CE over every position, padding included."""
    padded = torch.full((len(batch_ids), max_length), pad_id, dtype=torch.long)
    for row, ids in enumerate(batch_ids):
        padded[row, : len(ids)] = torch.tensor(ids)
    teacher_logits = teacher(input_ids=padded).logits.float()
    student_logits = student(input_ids=padded).logits.float()
    teacher_probs = F.softmax(teacher_logits, dim=-1)
    student_log_probs = F.log_softmax(student_logits, dim=-1)
    kd = (teacher_probs * (torch.log(teacher_probs + 1e-12) - student_log_probs)).sum(-1).mean()
    ce = F.cross_entropy(student_logits[:, :-1].reshape(-1, student_logits.size(-1)), padded[:, 1:].reshape(-1))
    loss = kd + 0.1 * ce
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def held_out_loss(teacher, student, batch: dict) -> float:
    """The same metric for every student: the project's KD + CE over real targets on unseen samples."""
    with torch.no_grad():
        return workload.project_loss(
            teacher, student, DistillationLoss(alpha=1.0, beta=0.1, temperature=1.0), batch
        ).loss.item()


def loss_peak_memory(variant: str, vocab_size: int = 50257, length: int = 1024, width: int = 768) -> int:
    """Peak memory (bytes) that one KD + CE forward and backward adds, from GPT-2-sized hidden states and heads.

    Run in a fresh process per variant (see `measured_in_subprocess`): the peak resident size of a process only grows.
    Linux only (it reads VmHWM).
    """
    from loss import ChunkedDistillationLoss

    generator = torch.Generator().manual_seed(0)
    # Heads at GPT-2's initial scale (std 0.02): logits of a few units, as in a real model. Unit-variance heads
    # would give logits of about 28 whose softmax underflows to denormals, which are slow to compute on a CPU.
    student_hidden = torch.randn(1, length, width, generator=generator, requires_grad=True)
    student_head = (0.02 * torch.randn(vocab_size, width, generator=generator)).requires_grad_()
    teacher_hidden = torch.randn(1, length, width, generator=generator)
    teacher_head = 0.02 * torch.randn(vocab_size, width, generator=generator)
    labels = torch.randint(0, vocab_size, (1, length), generator=generator)
    baseline = _peak_resident_bytes()
    if variant == "naive":
        output = DistillationLoss(1.0, 0.1, 1.0)(
            ModelOutput(student_hidden @ student_head.T), ModelOutput(teacher_hidden @ teacher_head.T), labels
        )
    else:
        output = ChunkedDistillationLoss(1.0, 0.1, 1.0)(
            ModelOutput(hidden=student_hidden, head=student_head),
            ModelOutput(hidden=teacher_hidden, head=teacher_head),
            labels,
        )
    output.loss.backward()
    return _peak_resident_bytes() - baseline


def _peak_resident_bytes() -> int:
    # VmHWM belongs to this process's own memory map; ru_maxrss would start at the parent's peak after a fork.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("the peak-memory measurement needs Linux (/proc/self/status)")


def measured_in_subprocess(variant: str) -> int:
    import os
    import subprocess

    # glibc keeps freed blocks of a few MiB in its heap and reuses them in patterns that vary from run to run, and so
    # does the peak resident size (0.086 to 0.116 of the full-logits peak for the same fused loss); with a fixed mmap
    # threshold every block over 1 MiB is mapped and unmapped, and the peak is that of the live tensors (stable).
    completed = subprocess.run(
        [sys.executable, "-m", "bench.throughput", "--loss-memory", variant],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)},
    )
    return int(completed.stdout.strip().splitlines()[-1])


def time_seed_steps(
    seed_teacher, teacher, student, train_samples, held_out_batch, work: Path, batch_size: int, max_length: int
) -> tuple:
    """The original's step over the training samples: (name, seconds, computed tokens, last loss, held-out loss)."""
    # The original kept its tokenized data as a JSON file of lists; read it back as the original did.
    json_file = work / "tokens.json"
    json_file.write_text(json.dumps(train_samples))
    start = time.perf_counter()
    seed_data = json.loads(json_file.read_text())
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    for begin in range(0, len(train_samples), batch_size):
        last_loss = seed_step(seed_teacher, student, optimizer, seed_data[begin : begin + batch_size], max_length, 0)
    return (
        "seed step",
        time.perf_counter() - start,
        len(train_samples) * max_length,
        last_loss,
        held_out_loss(teacher, student, held_out_batch),
        "float32",
    )


def time_project_steps(
    teachers: dict,
    student,
    initial_state: dict,
    train_samples,
    held_out_batch,
    work: Path,
    batch_size: int,
    max_length: int,
) -> list[tuple]:
    """This project's step in float32 with the full-logits loss, then with the fused loss (config.yaml's default),
    then with its precision on this machine (`mixed_precision: auto`: bf16 autocast and a bf16 teacher where the
    CPU has native bf16), then also packed; each from the same initial student:
    (name, seconds, computed tokens, last loss, held-out loss, precision)."""
    from datasets import Dataset

    Dataset.from_dict(
        {
            "input_ids": train_samples,
            "prompt_length": [0] * len(train_samples),
            "length": [len(ids) for ids in train_samples],
        }
    ).save_to_disk(str(work / "arrow"))
    padding = batching.PaddingCollator(pad_token_id=0)
    auto = "bf16" if hardware.has_native_bf16("cpu") else "float32"
    project_steps = (
        ("full logits", DistillationLoss(1.0, 0.1).run_as(fused=False), padding, "float32"),
        ("fused loss", DistillationLoss(1.0, 0.1).run_as(fused=True), padding, "float32"),
        (f"+ {auto} (auto)", DistillationLoss(1.0, 0.1).run_as(fused=True), padding, auto),
        ("+ packing", DistillationLoss(1.0, 0.1).run_as(fused=True), batching.PackingCollator(0, max_length), auto),
    )
    rows = []
    for name, criterion, collate, precision in project_steps:
        student = as_project_builds_it(student)
        student.load_state_dict(initial_state)
        start = time.perf_counter()
        tokenized = Dataset.load_from_disk(str(work / "arrow"))
        sampler = batching.LengthGroupedBatchSampler(tokenized["length"], batch_size, seed=0)
        loader = torch.utils.data.DataLoader(tokenized, batch_sampler=sampler, collate_fn=collate)
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3, fused=True)  # as trainer.build_optimizer
        computed_tokens = 0
        for batch in loader:
            computed_tokens += batch["input_ids"].numel()
            last_loss = workload.project_step(
                teachers[precision], student, optimizer, criterion, batch, precision == "bf16"
            )
        seconds = time.perf_counter() - start
        rows.append(
            (
                name,
                seconds,
                computed_tokens,
                last_loss,
                held_out_loss(teachers["float32"], student, held_out_batch),
                precision,
            )
        )
    return rows


def report(
    rows: list[tuple], train_samples, student, teacher, matmul: dict, memory: tuple[int, int], width: int
) -> dict:
    """The table; the figures for the JSON line."""
    real_tokens = sum(len(ids) for ids in train_samples)
    print(
        f"{'step':<18}{'real tokens/s':>15}{'vs seed':>9}{'computed/real':>15}{'matmul eff.':>13}"
        f"{'last loss':>11}{'held-out loss':>15}"
    )
    seed_rate = real_tokens / rows[0][1]
    # Model FLOPs count real tokens attending to their own sample only: padding and masked attention are waste.
    real_context = sum(len(ids) ** 2 for ids in train_samples) / 2 / real_tokens
    flops_per_token = workload.training_flops_per_token(student, teacher, real_context)
    efficiencies = {}
    for name, seconds, computed, last, held, precision in rows:
        rate = real_tokens / seconds
        efficiencies[name] = flops_per_token * rate / matmul[precision]  # of the matmul rate in the row's precision
        print(
            f"{name:<18}{rate:>15.0f}{rate / seed_rate:>9.2f}{computed / real_tokens:>15.2f}"
            f"{efficiencies[name]:>13.2f}{last:>11.4f}{held:>15.4f}"
        )
    naive_memory, chunked_memory = memory
    print(
        f"machine matmul (best of two measurements): float32 {matmul['float32'] / 1e9:.0f} GFLOP/s, bf16 "
        f"{matmul['bf16'] / 1e9:.0f} GFLOP/s"
    )
    print(
        f"KD + CE loss at V=50257, T=1024, d=768, forward and backward: full-logits peak "
        f"{naive_memory / 2**20:.0f} MiB, fused (loss.ChunkedDistillationLoss) peak {chunked_memory / 2**20:.0f} MiB"
    )
    seconds = {row[0]: row[1] for row in rows}
    held_out = {row[0]: row[4] for row in rows}
    default = rows[3][0]  # config.yaml's step on this machine
    return {
        "real_tokens_per_s_ratio": round(seconds["seed step"] / seconds[default], 2),
        "real_tokens_per_s_ratio_float32": round(seconds["seed step"] / seconds["fused loss"], 2),
        "real_tokens_per_s_ratio_full_logits": round(seconds["seed step"] / seconds["full logits"], 2),
        "real_tokens_per_s_ratio_packed": round(seconds["seed step"] / seconds["+ packing"], 2),
        "kd_loss_peak_memory_ratio": round(chunked_memory / naive_memory, 3),
        "matmul_efficiency": round(efficiencies[default], 3),
        "matmul_efficiency_float32": round(efficiencies["fused loss"], 3),
        "seed_held_out_loss": round(held_out["seed step"], 4),
        "project_held_out_loss": round(held_out[default], 4),
        "float32_held_out_loss": round(held_out["fused loss"], 4),
        "real_tokens": real_tokens,
        "width": width,
    }


def main(argv=None) -> int:
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples, under 3 minutes on 2 CPU cores")
    parser.add_argument("--loss-memory", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    if arguments.loss_memory:
        print(loss_peak_memory(arguments.loss_memory))
        return 0
    samples_count = 24 if arguments.quick else 64
    max_length, batch_size, vocab_size, width = 1024, 8, 8192, WIDTH
    torch.manual_seed(0)

    seed_teacher, student = workload.build_models(
        vocab_size, width, teacher_layers=4, student_layers=2, positions=max_length
    )
    teacher = as_project_builds_it(seed_teacher)
    teachers = {"float32": teacher, "bf16": as_project_builds_it(seed_teacher).to(torch.bfloat16)}
    initial_state = {key: value.clone() for key, value in student.state_dict().items()}
    samples = workload.alpaca_like_samples(samples_count + batch_size, max_length, vocab_size)
    train_samples, held_out = samples[:samples_count], samples[samples_count:]
    held_out_batch = batching.PaddingCollator(pad_token_id=0)(
        [{"input_ids": ids, "prompt_length": 0} for ids in held_out]
    )
    before = workload.matmul_rates()
    with tempfile.TemporaryDirectory() as work:
        rows = [
            time_seed_steps(
                seed_teacher, teacher, student, train_samples, held_out_batch, Path(work), batch_size, max_length
            )
        ]
        rows += time_project_steps(
            teachers, student, initial_state, train_samples, held_out_batch, Path(work), batch_size, max_length
        )
    rates = workload.matmul_rates(before)
    memory = measured_in_subprocess("naive"), measured_in_subprocess("chunked")
    print(
        f"{samples_count} samples, {sum(len(ids) for ids in train_samples)} real tokens, batch {batch_size}, "
        f"max length {max_length}, vocabulary {vocab_size}, width {width}, teacher 4 layers, student 2 layers, "
        f"{torch.get_num_threads()} threads"
    )
    figures = report(rows, train_samples, student, teacher, rates, memory, width)
    print()
    figures.update(real_shape.run(arguments.quick))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
