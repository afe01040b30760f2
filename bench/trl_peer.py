"""A peer row for bench/real_shape.py (and so bench/throughput.py): TRL's GKDTrainer on the same models, batches and
batch size as the project.

With `lmbda=0` GKD never generates (its `random.random() <= lmbda` draw is essentially never true) and with `beta=0`
its generalized JSD is the forward KL(teacher || student) over the vocabulary, averaged over target tokens: the
supervised distillation that the project's step also does, so the two timings compare like with like. TRL is an
optional extra (bench/requirements.txt); without it the row is skipped.

    python3 -m bench.trl_peer    # from the repository root: a smoke run at a tiny shape, fp32 and bf16
"""

from __future__ import annotations

import contextlib
import importlib
import os
import tempfile
import time

import torch
from transformers import PrinterCallback, TrainerCallback

from bench import workload
from distillation.data import batching

MODEL_KEYS = ("input_ids", "attention_mask", "labels")  # what GKDTrainer.compute_loss reads; other keys are dropped
SKIPPED = "TRL is not installed (pip install -r bench/requirements.txt): the peer row is skipped"
# Attributes that TRL (its fused LM head) and Accelerate (the autocast wrapper) set on a model instance.
PATCHED_ATTRIBUTES = ("forward", "_original_forward")


class StepTimer(TrainerCallback):
    """Sums the wall-clock time of the optimizer steps after the first `warmup` ones. The trainer calls
    on_step_begin after fetching the batch and on_step_end after the optimizer step, so data loading is excluded."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.seconds = 0.0
        self.started = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step > self.warmup:  # global_step already counts the step that just ended
            self.seconds += time.perf_counter() - self.started


def placeholder_tokenizer():
    """SFTTrainer insists on a tokenizer (without one it fetches it from the Hub); the batches are already tokenized,
    so a one-token vocabulary whose pad id is 0 (as the bench's PaddingCollator) is all it needs."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocabulary = Tokenizer(models.WordLevel({"<pad>": 0}, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=vocabulary, pad_token="<pad>", eos_token="<pad>")


def batch_feed(batches: list[dict], batch_size: int):
    """A dataset of `batch_size` rows per batch, all holding that batch's index, read in order (the trainer's
    sequential sampler cuts it into groups of `batch_size` rows), and a collator that returns the pre-collated batch
    the group points to: the trainer sees the batches exactly as given, in order and with their padding."""
    from datasets import Dataset

    rows = Dataset.from_dict({"batch": [index for index in range(len(batches)) for _ in range(batch_size)]})

    def collate(group: list[dict]) -> dict:
        indices = sorted({row["batch"] for row in group})
        if len(indices) != 1:
            raise RuntimeError(f"the trainer mixed batches {indices}: the peer would not see the same batches")
        return {key: batches[indices[0]][key] for key in MODEL_KEYS}

    return rows, collate


@contextlib.contextmanager
def unpatched_afterwards(*networks):
    """TRL and Accelerate wrap the models' `forward` on the instances; put the caller's back when the run ends."""
    saved = [
        {name: value for name, value in vars(network).items() if name in PATCHED_ATTRIBUTES} for network in networks
    ]
    try:
        yield
    finally:
        for network, attributes in zip(networks, saved):
            for name in PATCHED_ATTRIBUTES:
                vars(network).pop(name, None)
            vars(network).update(attributes)


def steps_on_the_cpu(batch_size: int, bf16: bool) -> dict:
    """The TRL trainer arguments that every peer row shares: one micro-batch of `batch_size` a step on the CPU, in
    bf16 or not, nothing saved, logged or reported, and no gradient checkpointing (TRL turns it on by default, as
    `gradient_checkpointing`; the project's step recomputes nothing, so neither does the peer. Set by its new name,
    which also silences the deprecation warning of the old one)."""
    return {
        "per_device_train_batch_size": batch_size,
        "gradient_accumulation_steps": 1,
        "bf16": bf16,
        "use_cpu": True,
        "report_to": [],
        "save_strategy": "no",
        "logging_strategy": "no",
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": False,
        "activation_checkpointing": False,
        "disable_tqdm": True,
    }


def trl_gkd_seconds(teacher, student, batches: list[dict], bf16: bool, warmup: int = 1) -> float | None:
    """Seconds of GKDTrainer's training steps (forward of both models, loss, backward, clipping, AdamW step) over
    `batches[warmup:]`, after `warmup` untimed steps; None when TRL is not installed."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        importlib.import_module("trl")
    except ImportError:
        print(SKIPPED)
        return None
    import transformers
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    transformers.logging.set_verbosity_error()
    batch_size = batches[0]["input_ids"].shape[0]
    rows, collate = batch_feed(batches, batch_size)
    timer = StepTimer(warmup)
    with tempfile.TemporaryDirectory() as output_dir, unpatched_afterwards(teacher, student):
        config = GKDConfig(
            lmbda=0.0,
            beta=0.0,
            temperature=1.0,
            seq_kd=False,
            max_steps=len(batches),
            learning_rate=1e-4,
            output_dir=output_dir,
            remove_unused_columns=False,
            train_sampling_strategy="sequential",
            **steps_on_the_cpu(batch_size, bf16),
        )
        trainer = GKDTrainer(
            model=student,
            teacher_model=teacher,
            args=config,
            data_collator=collate,
            train_dataset=rows,
            processing_class=placeholder_tokenizer(),
            callbacks=[timer],
        )
        trainer.remove_callback(PrinterCallback)  # with disable_tqdm it would print the end-of-training metrics
        trainer.train()
    return timer.seconds


def smoke() -> None:
    """Tiny shape, both precisions: checks that the peer runs, not how fast it is."""
    collate = batching.PaddingCollator(0)
    samples = workload.alpaca_like_samples(12, 64, 512)
    batches = [collate([{"input_ids": ids, "prompt_length": 0} for ids in samples[i : i + 4]]) for i in range(0, 12, 4)]
    for bf16 in (False, True):
        teacher, student = workload.build_models(512, 64, teacher_layers=2, student_layers=1, positions=64)
        if bf16:
            teacher = teacher.to(torch.bfloat16)
        seconds = trl_gkd_seconds(teacher, student, batches, bf16=bf16)
        if seconds is None:
            return
        real_tokens = sum(int(batch["attention_mask"].sum()) for batch in batches[1:])
        print(f"GKDTrainer bf16={bf16}: {seconds:.3f} s for 2 timed batches, {real_tokens / seconds:.0f} real tokens/s")


if __name__ == "__main__":
    smoke()
