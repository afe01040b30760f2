"""GPT-2's real shapes on this machine: this project's training step against TRL's GKDTrainer, and where the time goes.

    python3 -m bench.real_shape              # about 6 minutes on 2 CPU cores (python3 -m bench.throughput runs it too)
    python3 -m bench.real_shape --profile    # the top operators of the project's step (torch.profiler)

A GPT-2 (124M)-shaped teacher and a 6-layer student of GPT-2's shape (random weights, vocabulary 50257, width 768,
12 heads, no dropout), batches of 8 Alpaca-like samples of at most 256 tokens, length-grouped as the project batches
them. Side by side, from the same initial student on the same batches: this project's step (trainer.Trainer's: the
fused loss, fused AdamW) in float32 and with bf16 autocast and a bf16 teacher, and TRL's `GKDTrainer` with lmbda=0
(no generation) and beta=0 (forward KL) in both precisions (bench/trl_peer.py; skipped without TRL, which
bench/requirements.txt installs). Each row gives real tokens/s and the fraction of this machine's matmul rate in
the row's precision (measured in the same run) that the model FLOPs of those tokens make up.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import models
from bench import trl_peer, workload
from distillation.runtime import hardware
from loss import DistillationLoss

SHAPES = {  # vocabulary, width, heads, teacher layers, student layers, max length, batch size
    "gpt2": (50257, 768, 12, 12, 6, 256, 8),
    "tiny": (512, 64, 2, 2, 1, 64, 4),  # the same code in seconds (the test suite runs it)
}
# The side of the square products that measure the machine's matmul rates: 4096 at GPT-2's shapes; small for the
# tiny shape, since a CPU without native bf16 (AVX2 only) emulates a 4096 x 4096 bf16 product in tens of seconds.
MATMUL_SIDE = {"gpt2": 4096, "tiny": 512}


def build_models(shape: str = "gpt2"):
    """Teacher (float32 and a bfloat16 copy) and student of GPT-2's architecture, the project's fused GELU, no
    dropout."""
    from transformers import AutoModelForCausalLM, GPT2Config

    vocabulary, width, heads, teacher_layers, student_layers, *_ = SHAPES[shape]

    def gpt2(layers: int):
        config = GPT2Config(
            vocab_size=vocabulary,
            n_positions=1024,
            n_embd=width,
            n_layer=layers,
            n_head=heads,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
        return AutoModelForCausalLM.from_config(models.with_fused_activation(config))

    torch.manual_seed(0)
    teacher = gpt2(teacher_layers).eval().requires_grad_(False)
    teacher_bf16 = gpt2(teacher_layers).to(torch.bfloat16).eval().requires_grad_(False)
    teacher_bf16.load_state_dict(teacher.state_dict())
    return {"float32": teacher, "bf16": teacher_bf16}, gpt2(student_layers)


def project_seconds(teacher, student, batches: list[dict], bf16: bool, warmup: int = 1) -> float:
    """Seconds of this project's steps over `batches[warmup:]`: forward passes and loss (under bf16 autocast with
    `bf16`), backward, fused AdamW. The loss as distill.py builds config.yaml's: DistillationLoss, fused."""
    criterion = DistillationLoss(alpha=1.0, beta=0.1).run_as(fused=True)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=True)  # as trainer.build_optimizer
    for batch in batches[:warmup]:
        workload.project_step(teacher, student, optimizer, criterion, batch, bf16)
    start = time.perf_counter()
    for batch in batches[warmup:]:
        workload.project_step(teacher, student, optimizer, criterion, batch, bf16)
    return time.perf_counter() - start


def measure_rows(teachers: dict, student, batches: list[dict]) -> dict:
    """Seconds per row, each from the same initial student; None for a TRL row without TRL."""
    initial_state = {key: value.clone() for key, value in student.state_dict().items()}
    rows = {}
    for precision in ("float32", "bf16"):
        bf16 = precision == "bf16"
        student.load_state_dict(initial_state)
        rows[f"this project, {precision}"] = project_seconds(teachers[precision], student, batches, bf16)
        student.load_state_dict(initial_state)
        rows[f"TRL GKDTrainer, {precision}"] = trl_peer.trl_gkd_seconds(
            teachers[precision], student, batches, bf16=bf16
        )
    return rows


def report(rows: dict, batches: list[dict], student, teacher, rates: dict, side: int = 4096) -> dict:
    """The table; the figures for the JSON line. `rates` were measured on `side` x `side` products."""
    timed = batches[1:]
    real_tokens = sum(int(batch["attention_mask"].sum()) for batch in timed)
    lengths = [int(length) for batch in timed for length in batch["attention_mask"].sum(dim=1)]
    flops_per_token = workload.training_flops_per_token(student, teacher, sum(n * n for n in lengths) / 2 / real_tokens)
    computed = sum(batch["input_ids"].numel() for batch in timed)
    config = student.config
    print(
        f"GPT-2's architecture: teacher {teacher.config.n_layer} layers, student {config.n_layer}, width "
        f"{config.n_embd}, vocabulary {config.vocab_size}; {len(timed)} timed batches of {len(timed[0]['input_ids'])} "
        f"(after 1 warm-up), {real_tokens} real tokens, "
        f"computed/real {computed / real_tokens:.2f}; {flops_per_token / 1e9:.2f} GFLOP per token; "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"machine matmul: float32 {rates['float32'] / 1e9:.0f} GFLOP/s, bf16 {rates['bf16'] / 1e9:.0f} GFLOP/s "
        f"(best of three, {side} x {side})"
    )
    print(f"{'step':<30}{'real tokens/s':>15}{'of matmul rate':>16}")
    rates_by_row = {}
    for name, seconds in rows.items():
        if seconds is None:
            print(f"{name:<30}{'skipped':>15}")
            continue
        rate = real_tokens / seconds
        rates_by_row[name] = rate
        share = flops_per_token * rate / rates["bf16" if name.endswith("bf16") else "float32"]
        print(f"{name:<30}{rate:>15.0f}{share:>16.2f}")
    ours = max(rate for name, rate in rates_by_row.items() if name.startswith("this project"))
    theirs = [rate for name, rate in rates_by_row.items() if name.startswith("TRL")]
    best_precision = (
        "bf16" if rates_by_row["this project, bf16"] >= rates_by_row["this project, float32"] else "float32"
    )
    return {
        "real_shape_tokens_per_s": round(ours),
        "real_shape_matmul_share": round(flops_per_token * ours / rates[best_precision], 3),
        "ratio_vs_trl": round(ours / max(theirs), 2) if theirs else None,
    }


def profile_step(teachers: dict, student, batches: list[dict], rows: int = 15, shapes: bool = False) -> None:
    """The project's bf16 step under torch.profiler: its top operators by their own time."""
    from torch.profiler import ProfilerActivity, profile

    project_seconds(teachers["bf16"], student, batches[:1], bf16=True, warmup=1)  # warm-up outside the profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=shapes) as profiler:
        project_seconds(teachers["bf16"], student, batches[1:3], bf16=True, warmup=0)
    print(
        profiler.key_averages(group_by_input_shape=shapes).table(
            sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=44, max_shapes_column_width=50
        )
    )


def run(quick: bool, profile: bool = False, shape: str = "gpt2") -> dict:
    """The real-shape rows (or the profile); the figures for bench/throughput.py's JSON line."""
    teachers, student = build_models(shape)
    vocabulary, *_, max_length, batch_size = SHAPES[shape]
    timed_batches = 3 if quick else 6
    samples = workload.alpaca_like_samples((timed_batches + 1) * batch_size, max_length, vocabulary, seed=1)
    batches = workload.length_grouped_batches(samples, batch_size, torch.device("cpu"))
    if profile:
        profile_step(teachers, student, batches)
        return {}
    before = workload.matmul_rates(size=MATMUL_SIDE[shape])
    rows = measure_rows(teachers, student, batches)
    rates = workload.matmul_rates(before, MATMUL_SIDE[shape])
    figures = report(rows, batches, student, teachers["float32"], rates, MATMUL_SIDE[shape])
    figures["native_bf16"] = hardware.has_native_bf16("cpu")
    return figures


def main(argv=None) -> int:
    import transformers

    transformers.logging.set_verbosity_error()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 timed batches per row instead of 6")
    parser.add_argument("--profile", action="store_true", help="print the top operators of the bf16 step instead")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gpt2", help="gpt2 (default) or tiny (seconds)")
    arguments = parser.parse_args(argv)
    figures = run(arguments.quick, arguments.profile, arguments.shape)
    if figures:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
