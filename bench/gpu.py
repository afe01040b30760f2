"""Real-shape training throughput on a CUDA GPU: a GPT-2 (124M) teacher and a 6-layer student of GPT-2's shape.

    bash bench/gpu.sh              # about 2 minutes on a recent data-centre GPU
    bash bench/gpu.sh --compile    # the same with torch.compile (hardware.compile), a minute or two more

Random weights of the real shapes (vocabulary 50257, width 768, 12 heads), Alpaca-like sample lengths (median about
200 tokens, max 1024), length-grouped batches padded to their longest sample, bf16 autocast for the student and a
bf16 teacher, as `distill.py` runs them with `hardware.mixed_precision: bf16`. For the plain and the chunked loss it
prints real tokens per second, model FLOP/s, MFU against the card's dense bf16 peak and the peak memory; the last
line is one JSON object. `--device cpu --shape tiny` runs the same code on a CPU at toy size (the test suite does).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import models
from bench import workload
from loss import ChunkedDistillationLoss, DistillationLoss

# Dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s, without sparsity), matched on the device name.
BF16_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 756.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A10G": 70.0,
    "A10": 125.0,
    "L40S": 362.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "V100": 125.0,
}
SHAPES = {  # teacher layers, student layers, width, heads, vocabulary, max length, batch size
    "gpt2": (12, 6, 768, 12, 50257, 1024, 32),
    "tiny": (2, 1, 64, 2, 512, 128, 4),
}


def card_peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(BF16_PEAK_TFLOPS, key=len, reverse=True):  # "H100 SXM" before "H100"
        if key in name:
            return BF16_PEAK_TFLOPS[key] * 1e12
    return None


def build_models(shape: str, device: torch.device):
    from transformers import AutoModelForCausalLM, GPT2Config

    teacher_layers, student_layers, width, heads, vocab_size, max_length, _ = SHAPES[shape]

    def gpt2(layers: int, dtype: torch.dtype):
        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=max_length,
            n_embd=width,
            n_layer=layers,
            n_head=heads,
            bos_token_id=0,
            eos_token_id=0,
        )
        return AutoModelForCausalLM.from_config(models.with_fused_activation(config), dtype=dtype).to(device)

    torch.manual_seed(0)
    teacher_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher = gpt2(teacher_layers, teacher_dtype).eval().requires_grad_(False)
    student = gpt2(student_layers, torch.float32)
    return teacher, student


def measure(teacher, student, criterion, batches, warmup: int, use_autocast: bool, device: torch.device) -> dict:
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    student.train()

    def step(batch):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
            output = workload.project_loss(teacher, student, criterion, batch)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return output.loss

    for batch in batches[:warmup]:  # compilation, allocator and kernel selection happen here
        step(batch)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    measured = batches[warmup:]
    start = time.perf_counter()
    for batch in measured:
        loss = step(batch)
    final_loss = loss.item()  # one sync at the end
    synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "real_tokens": sum(batch["real_tokens"] for batch in measured),
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "final_loss": final_loss,
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def report_row(label: str, figures: dict, flops_per_token: float, peak: float | None) -> dict:
    """Print one loss's row of the table; return its figures for the JSON line."""
    rate = figures["real_tokens"] / figures["seconds"]
    model_flops = flops_per_token * rate
    mfu = model_flops / peak if peak else None
    memory = f"{figures['peak_memory_gib']:.1f} GiB" if figures["peak_memory_gib"] is not None else "-"
    print(f"{label:<28}{rate:>15.0f}{model_flops / 1e12:>15.2f}{(f'{mfu:.1%}' if mfu else '-'):>8}{memory:>13}")
    return {
        "real_tokens_per_s": round(rate),
        "model_tflops": round(model_flops / 1e12, 2),
        "mfu": round(mfu, 3) if mfu is not None else None,
        "peak_memory_gib": round(figures["peak_memory_gib"], 2) if figures["peak_memory_gib"] is not None else None,
        "final_loss": round(figures["final_loss"], 4),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gpt2")
    parser.add_argument("--steps", type=int, default=30, help="measured steps per loss (after --warmup)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, help="samples per step (default: 32 for gpt2)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models, as hardware.compile does")
    parser.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, if its name is not known here")
    arguments = parser.parse_args(argv)
    if arguments.device == "cuda" and not torch.cuda.is_available():
        print(
            "python3 -m bench.gpu needs a CUDA GPU (python3 -m bench.gpu --device cpu --shape tiny tries it on a CPU)",
            file=sys.stderr,
        )
        return 2
    device = torch.device(arguments.device)
    *_, vocab_size, max_length, default_batch = SHAPES[arguments.shape]
    batch_size = arguments.batch_size or default_batch
    torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 parts (optimizer, loss) as a user's run would
    teacher, student = build_models(arguments.shape, device)
    if arguments.compile:
        teacher.compile(dynamic=True)
        student.compile(dynamic=True)
    initial_state = {key: value.clone() for key, value in student.state_dict().items()}

    samples = workload.alpaca_like_samples((arguments.warmup + arguments.steps) * batch_size, max_length, vocab_size)
    batches = workload.length_grouped_batches(samples, batch_size, device)
    real_context = sum(len(ids) ** 2 for ids in samples) / 2 / sum(len(ids) for ids in samples)
    flops_per_token = workload.training_flops_per_token(student, teacher, real_context)
    peak = card_peak_flops(device, arguments.peak_tflops)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"{name}; teacher {teacher.config.n_layer} layers, student {student.config.n_layer} layers, width "
        f"{student.config.n_embd}, vocabulary {vocab_size}; batch {batch_size}, {arguments.steps} measured steps; "
        f"bf16 autocast {'on' if device.type == 'cuda' else 'off'}; compile {'on' if arguments.compile else 'off'}"
    )
    print(f"{'loss':<28}{'real tokens/s':>15}{'model TFLOP/s':>15}{'MFU':>8}{'peak memory':>13}")
    results = {}
    for label, criterion in (
        ("DistillationLoss", DistillationLoss(1.0, 0.1, 1.0)),
        ("ChunkedDistillationLoss", ChunkedDistillationLoss(1.0, 0.1, 1.0)),
    ):
        student.load_state_dict(initial_state)
        figures = measure(teacher, student, criterion, batches, arguments.warmup, device.type == "cuda", device)
        results[label] = report_row(label, figures, flops_per_token, peak)
    print(json.dumps({"device": name, "compile": arguments.compile, "batch_size": batch_size, **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
