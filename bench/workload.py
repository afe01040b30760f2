"""What the benchmarks time and how they count it: Alpaca-like samples in the project's batches, GPT-2-shaped models,
the project's training step, the model FLOPs of a token and the machine's matmul rate.

bench/throughput.py, bench/real_shape.py, bench/gpu.py and bench/trl_peer.py share it; it imports none of them.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

import models
from distillation.data import batching
from loss import ModelOutput


def alpaca_like_samples(count: int, max_length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    generator = np.random.default_rng(seed)
    lengths = np.clip(generator.lognormal(math.log(200), 0.6, size=count).astype(int), 8, max_length)
    return [generator.integers(1, vocab_size, size=length).tolist() for length in lengths]


def length_grouped_batches(samples: list[list[int]], batch_size: int, device: torch.device) -> list[dict]:
    """The samples in length-grouped, padded batches on the device, as the project batches them."""
    sampler = batching.LengthGroupedBatchSampler([len(ids) for ids in samples], batch_size, seed=0)
    collate = batching.PaddingCollator(pad_token_id=0)
    batches = []
    for indices in sampler:
        batch = collate([{"input_ids": samples[index], "prompt_length": 0} for index in indices])
        batches.append({key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()})
    return batches


def build_models(vocab_size: int, width: int, teacher_layers: int, student_layers: int, positions: int):
    """Teacher and student as the original built them (GPT-2's config, its "gelu_new" activation), random weights."""
    from transformers import AutoModelForCausalLM, GPT2Config

    def gpt2(layers: int):
        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=positions,
            n_embd=width,
            n_layer=layers,
            n_head=width // 64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
        return AutoModelForCausalLM.from_config(config)

    torch.manual_seed(0)
    teacher = gpt2(teacher_layers).eval().requires_grad_(False)
    student = gpt2(student_layers)
    return teacher, student


def project_loss(teacher, student, criterion, batch: dict, bf16: bool = False):
    """The loss as trainer.Trainer computes it: no KV cache; hidden states and heads for the fused loss; the
    forward passes and the loss under bf16 autocast with `bf16` (the fused loss projects in bf16 there)."""
    inputs = models.model_inputs(batch)
    device_type = batch["input_ids"].device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
        if criterion.projects_hidden_states:
            with torch.no_grad():
                teacher_output = ModelOutput(hidden=models.HiddenStates(teacher)(**inputs), head=teacher.lm_head.weight)
            student_output = ModelOutput(hidden=models.HiddenStates(student)(**inputs), head=student.lm_head.weight)
            return criterion(student_output, teacher_output, batch["labels"])
        with torch.no_grad():
            teacher_logits = teacher(**inputs).logits
        return criterion(ModelOutput(student(**inputs).logits), ModelOutput(teacher_logits), batch["labels"])


def project_step(teacher, student, optimizer, criterion, batch: dict, bf16: bool = False) -> float:
    output = project_loss(teacher, student, criterion, batch, bf16)
    output.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return output.loss.item()


def training_flops_per_token(model, teacher, context: float) -> float:
    """6 N per token for the student (forward and backward) and 2 N for the teacher's forward, N counting every
    matmul weight (the tied output head included), plus the attention scores over the context."""

    def matmul_parameters(network) -> int:
        config = network.config
        blocks = 12 * config.n_layer * config.n_embd**2
        return blocks + config.vocab_size * config.n_embd

    def attention(network) -> float:
        return 2 * 2 * network.config.n_layer * network.config.n_embd * context

    return 6 * matmul_parameters(model) + 3 * attention(model) + 2 * matmul_parameters(teacher) + attention(teacher)


def matmul_rate(dtype: torch.dtype = torch.float32, size: int = 4096, repeats: int = 3, budget_s: float = 2.0) -> float:
    """The machine's matmul FLOP/s in `dtype`: the best of three timings, since other work on a shared machine only
    slows it. The products are `size` x `size`, or smaller where one would take over `budget_s` seconds: a CPU
    without AMX or AVX-512 BF16 emulates bf16 some 40x slower than float32, and a 4096-side product would take
    minutes there (hours on a busy machine)."""
    probe = torch.randn(512, 512, dtype=dtype)
    probe @ probe  # warm-up
    start = time.perf_counter()
    probe @ probe
    seconds_at_512 = time.perf_counter() - start
    while size > 512 and seconds_at_512 * (size / 512) ** 3 > budget_s:
        size //= 2
    left, right = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    left @ right  # warm-up
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            left @ right
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 * repeats / best


def matmul_rates(earlier: dict | None = None, size: int = 4096) -> dict:
    """The matmul rate in float32 and bf16 on `size` x `size` products, or the better of it and `earlier` (measured
    before the rows): other work on a shared machine only slows it."""
    rates = {"float32": matmul_rate(torch.float32, size), "bf16": matmul_rate(torch.bfloat16, size)}
    return {name: max(rate, (earlier or {}).get(name, 0.0)) for name, rate in rates.items()}
