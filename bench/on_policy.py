"""The on-policy step against TRL's: this project's optimizer step with `responses.lmbda: 1` (the student samples
each prompt's response, reverse KL on it) against TRL's `DistillationTrainer` (on-policy only; HF generate, no
vLLM; beta=1: reverse KL), on the same teacher, student, prompts, max_new_tokens and batch size.

    python3 -m bench.on_policy                  # the demo's shape, then GPT-2's (15 minutes or more on 2 CPU cores)
    python3 -m bench.on_policy --shape demo     # one shape; --quick: fewer timed steps
    python3 -m bench.on_policy --profile        # the top operators of the project's step at GPT-2's shape

Shapes: `demo` is the embedded demo's (assets/tiny/teacher and its untrained 2-layer truncation, the first prompts
of its data in its template, batch 16, 64 new tokens); `gpt2` is GPT-2's real shape (a 124M-shaped teacher with
random weights, a 6-layer student, vocabulary 50257; prompts of 16 to 96 tokens, batch 8, 64 new tokens); `tiny`
is the same code in seconds. Each step counts its generation: both sides sample every
prompt's response from the student (temperature 1, no truncation), score it with the teacher and update the
student (AdamW, gradients clipped at 1). Both write exactly `max_new_tokens` tokens per prompt: the EOS they are
given is one that no model can write (an id past the vocabulary), so neither stops early and both train on the
same number of tokens. Each side runs at its best precision on this machine (bf16 autocast and a bf16 teacher
where the CPU has native bf16, else float32). The steps alternate, one of TRL's then one of this project's on the
same prompts, so that other work on the machine slows both alike; the first step of each is a warm-up. The last
line is one JSON object; `on_policy_ratio_vs_trl` is this project's steps per second over TRL's (> 1: faster), the
smaller of the shapes' when both ran.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import models
from bench import real_shape, trl_peer, workload
from distillation.run.checkpoints import TrainerState
from distillation.runtime import hardware
from distillation.settings import schema
from distillation.training import networks, responses, steps
from distillation.training.trainer import build_optimizer
from loss import DistillationLoss

REPO = Path(__file__).resolve().parent.parent
DEMO_TEACHER, DEMO_DATA = REPO / "assets" / "tiny" / "teacher", REPO / "assets" / "tiny" / "alpaca_tiny.jsonl"
SHAPES = {  # batch size, max_new_tokens, timed steps (full, quick)
    "demo": (16, 64, (6, 3)),
    "gpt2": (8, 64, (3, 2)),
    "tiny": (4, 8, (2, 1)),
}
LEARNING_RATE, MAX_GRAD_NORM, SEED = 1e-4, 1.0, 0


def build_shape(shape: str):
    """(teacher, student, prompts) of the shape: float32 models, `prompts` one list of token ids per sample."""
    batch_size, _, (timed, _) = SHAPES[shape]
    count = (timed + 1) * batch_size
    if shape == "demo":
        teacher = models.load_teacher(str(DEMO_TEACHER))
        student = models.build_student(teacher.config, nb_layers=2)
        return teacher, student, demo_prompts(count)
    teachers, student = real_shape.build_models("gpt2" if shape == "gpt2" else "tiny")
    vocabulary = student.config.vocab_size
    # Alpaca-like lengths (a few dozen to a few hundred tokens), cut to the prompt's share of a short sample.
    max_prompt = 96 if shape == "gpt2" else 24
    samples = workload.alpaca_like_samples(count, 1024, vocabulary, seed=2)
    return teachers["float32"], student, [ids[: min(max_prompt, max(16, len(ids) // 3))] for ids in samples]


def demo_prompts(count: int) -> list[list[int]]:
    """The first `count` prompts of the demo's data, in its template (alpaca_short), tokenized by its teacher's
    tokenizer."""
    import dataset
    from distillation.settings.templates import PROMPT_TEMPLATES

    tokenizer = models.load_tokenizer(str(DEMO_TEACHER))
    rows = [json.loads(line) for line in DEMO_DATA.read_text().splitlines()[:count]]
    texts = [dataset.alpaca_prompt(row["instruction"], row["input"], PROMPT_TEMPLATES["alpaca_short"]) for row in rows]
    return [tokenizer(text)["input_ids"] for text in texts]


def best_precision() -> str:
    return "bf16" if hardware.has_native_bf16("cpu") else "float32"


class ProjectOnPolicy:
    """This project's on-policy optimizer step, as trainer.Trainer takes it: responses.ResponseSource generates the
    step's responses from the student and collates them, steps.OptimizerSteps computes the loss (the run's
    criterion without CE on student samples: reverse KL, fused), backward, clipping and the fused AdamW step."""

    def __init__(self, teacher, student, accelerator, max_new_tokens: int, eos_token_id: int) -> None:
        self.accelerator = accelerator
        training = schema.TrainingParameters(
            learning_rate=LEARNING_RATE, optimizer="adamw", max_grad_norm=MAX_GRAD_NORM, batch_size=1
        )
        criterion = DistillationLoss(alpha=1.0, beta=0.1, divergence="reverse_kl")
        criterion.run_as(fused=hardware.fused_loss(accelerator))
        optimizer = build_optimizer(student, training)
        self.networks = networks.Networks(accelerator, criterion, student, teacher, optimizer, False, False)
        tokenizer = SimpleNamespace(eos_token_id=eos_token_id, pad_token_id=0)
        settings = schema.Responses(lmbda=1.0, max_new_tokens=max_new_tokens)
        self.source = responses.ResponseSource(settings, SEED, self.networks, tokenizer, stand_in=None)
        scheduler = torch.optim.lr_scheduler.LambdaLR(self.networks.optimizer, lambda _: 1.0)
        self.steps = steps.OptimizerSteps(self.networks, scheduler, training, self.loss, None, None)
        self.state = TrainerState()

    def loss(self, batch: dict):
        criterion = self.source.criterion(batch)
        with self.accelerator.autocast():
            return criterion(*self.networks.forward(batch), batch["labels"])

    def step(self, prompts: list[list[int]]) -> float:
        """One optimizer step on `prompts`; its seconds."""
        started = time.perf_counter()
        self.networks.student.train()
        data_step = steps.Step([{"prompts": prompts}], 0, 0, len(prompts), 1)
        step = self.source.prepare(data_step, self.state.global_step + 1)
        self.steps.take(self.state, step.batches, step.targets)
        step.count(self.state)
        return time.perf_counter() - started


def word_tokenizer(vocabulary: int, eos_token_id: int):
    """A tokenizer whose words name token ids ("t17 t4 t903" is [17, 4, 903]): TRL's DistillationTrainer takes
    text prompts, and this gives it exactly the prompts this project gets. Token 0 pads; `eos_token_id` may lie past
    the vocabulary. (A special token's text is cut out of any word that holds it: "t0" is in no other word, "0" is.)"""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{index}": index for index in range(max(vocabulary, eos_token_id + 1))}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="t0", eos_token=f"t{eos_token_id}")
    fast.padding_side = "left"
    return fast


def as_text(prompt: list[int]) -> str:
    return " ".join(f"t{token}" for token in prompt)


def trl_trainer(teacher, student, prompts: list[list[int]], batch_size, max_new_tokens, eos_token_id, bf16, callback):
    """TRL's DistillationTrainer over `prompts` in order, `batch_size` a step, reverse KL (beta=1), pure sampling
    (temperature 1, no top-k or top-p), the same learning rate and clipping; no gradient checkpointing (the
    project's step recomputes nothing)."""
    import tempfile

    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    student.generation_config.eos_token_id = eos_token_id  # TRL stops at the model's EOS too
    student.generation_config.bos_token_id = None
    texts = [as_text(prompt) for prompt in prompts]
    output_dir = tempfile.mkdtemp(prefix="on_policy_trl_")
    config = DistillationConfig(
        output_dir=output_dir,
        beta=1.0,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_completion_length=max_new_tokens,
        max_steps=len(prompts) // batch_size,
        learning_rate=LEARNING_RATE,
        max_grad_norm=MAX_GRAD_NORM,
        lr_scheduler_type="constant",
        warmup_steps=0,
        shuffle_dataset=False,
        seed=SEED,
        **trl_peer.steps_on_the_cpu(batch_size, bf16),
    )
    return DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": texts}),
        processing_class=word_tokenizer(student.config.vocab_size, eos_token_id),
        callbacks=[callback],
    )


class Alternation:
    """A TRL callback: times each of TRL's steps, and after each runs this project's step on the same prompts."""

    def __init__(self, project: ProjectOnPolicy, batches: list[list[list[int]]]) -> None:
        from transformers import TrainerCallback

        self.project, self.batches = project, batches
        self.seconds = {"trl": [], "project": []}
        outer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                outer.started = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                outer.seconds["trl"].append(time.perf_counter() - outer.started)
                outer.seconds["project"].append(outer.project.step(outer.batches[state.global_step - 1]))

        self.callback = Callback()


def measure(shape: str, quick: bool) -> dict | None:
    """Seconds per step of each side (after the warm-up), alternated; None without TRL."""
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        print(trl_peer.SKIPPED)
        return None
    from accelerate import Accelerator
    from transformers import PrinterCallback

    batch_size, max_new_tokens, (timed, timed_quick) = SHAPES[shape]
    teacher, student, prompts = build_shape(shape)
    timed = timed_quick if quick else timed
    prompts = prompts[: (timed + 1) * batch_size]
    batches = [prompts[start : start + batch_size] for start in range(0, len(prompts), batch_size)]
    precision = best_precision()
    bf16 = precision == "bf16"
    if bf16:
        teacher = teacher.to(torch.bfloat16)
    eos_token_id = student.config.vocab_size  # never written: every response is max_new_tokens long
    trl_student, trl_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16" if bf16 else "no")
    project = ProjectOnPolicy(teacher, student, accelerator, max_new_tokens, eos_token_id)
    alternation = Alternation(project, batches)
    with trl_peer.unpatched_afterwards(trl_teacher, trl_student):
        trainer = trl_trainer(
            trl_teacher, trl_student, prompts, batch_size, max_new_tokens, eos_token_id, bf16, alternation.callback
        )
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    trl_lengths = trainer._metrics["train"]["completions/mean_length"]
    if any(length != max_new_tokens for length in trl_lengths):
        raise RuntimeError(f"TRL's completions were not all {max_new_tokens} tokens long: {trl_lengths}")
    seconds = {side: sum(values[1:]) / len(values[1:]) for side, values in alternation.seconds.items()}
    prompt_tokens = sum(len(prompt) for prompt in prompts[batch_size:]) / timed
    return {
        "shape": shape,
        "precision": precision,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "timed_steps": timed,
        "prompt_tokens_per_step": round(prompt_tokens),
        "project_s_per_step": round(seconds["project"], 3),
        "trl_s_per_step": round(seconds["trl"], 3),
        "project_steps": [round(value, 3) for value in alternation.seconds["project"]],
        "trl_steps": [round(value, 3) for value in alternation.seconds["trl"]],
        "on_policy_ratio_vs_trl": round(seconds["trl"] / seconds["project"], 2),
    }


def report(row: dict) -> None:
    generated = row["batch_size"] * row["max_new_tokens"]
    trained = generated + row["prompt_tokens_per_step"]
    print(
        f"{row['shape']}: batch {row['batch_size']}, {row['max_new_tokens']} new tokens per prompt ({generated} "
        f"generated and {trained} trained tokens a step), {row['precision']}, {row['timed_steps']} timed steps each "
        f"(alternated, after 1 warm-up), {torch.get_num_threads()} threads"
    )
    print(f"{'step':<34}{'s/step':>9}{'generated tokens/s':>20}")
    for name, seconds in (
        ("this project (lmbda 1)", row["project_s_per_step"]),
        ("TRL DistillationTrainer", row["trl_s_per_step"]),
    ):
        print(f"{name:<34}{seconds:>9.3f}{generated / seconds:>20.0f}")
    print(f"on_policy_ratio_vs_trl: {row['on_policy_ratio_vs_trl']}")


def profile(shape: str) -> None:
    """The project's on-policy step under torch.profiler: its top operators by their own time."""
    from accelerate import Accelerator
    from torch.profiler import ProfilerActivity, profile

    batch_size, max_new_tokens, _ = SHAPES[shape]
    teacher, student, prompts = build_shape(shape)
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    project = ProjectOnPolicy(teacher, student, accelerator, max_new_tokens, student.config.vocab_size)
    project.step(prompts[:batch_size])
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        project.step(prompts[batch_size : 2 * batch_size])
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=50))


def main(argv=None) -> int:
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), help="one shape (default: demo, then gpt2)")
    parser.add_argument("--quick", action="store_true", help="fewer timed steps")
    parser.add_argument("--profile", action="store_true", help="profile the project's step instead")
    parser.add_argument("--threads", type=int, help="torch's intra-op threads for both sides (default: torch's)")
    arguments = parser.parse_args(argv)
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    if arguments.profile:
        profile(arguments.shape or "gpt2")
        return 0
    figures = {}
    for shape in [arguments.shape] if arguments.shape else ["demo", "gpt2"]:
        row = measure(shape, arguments.quick)
        if row is None:
            figures["on_policy_ratio_vs_trl"] = None
            break
        report(row)
        figures[shape] = row
    rows = [row for row in figures.values() if isinstance(row, dict)]
    if rows:
        # The claim is the smaller of the shapes' ratios.
        figures["on_policy_ratio_vs_trl"] = min(row["on_policy_ratio_vs_trl"] for row in rows)
        figures["native_bf16"] = hardware.has_native_bf16("cpu")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
