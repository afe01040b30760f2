"""Rebuild the embedded demo's assets in assets/tiny/ from nothing (about 10 minutes on 2 CPU cores), from the
repository root:

    python3 -m assets.build_tiny

1. the synthetic Alpaca-format data set  -> assets/tiny/alpaca_tiny.jsonl   (assets/generate_tiny_data.py)
2. a byte-level BPE tokenizer trained on that data with `tokenizers`
3. a small GPT-2-architecture teacher, trained on the data's train split by distill.py itself with ClassicLoss
   (configs/tiny_teacher.yaml), whose best checkpoint becomes assets/tiny/teacher/.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from assets import generate_tiny_data

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "assets" / "tiny"
DATA_FILE = TINY / "alpaca_tiny.jsonl"
TEACHER_DIR = TINY / "teacher"
TEACHER_CONFIG = REPO / "configs" / "tiny_teacher.yaml"
VOCAB_SIZE = 2048
# What a user needs to load the teacher; the training state of the checkpoint is left out of the shipped copy.
SHIPPED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def teacher_architecture(tokenizer):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=256,
        n_embd=128,
        n_layer=4,
        n_head=4,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )


def train_byte_level_tokenizer(texts, vocab_size: int, eos_token: str = "<|endoftext|>"):
    """A GPT-2-style byte-level BPE tokenizer trained on `texts`: the demo's (and the tests' tiny ones).

    Its only special token is the EOS, which (as in GPT-2) also serves as BOS and as padding.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=eos_token, bos_token=eos_token, unk_token=eos_token, pad_token=eos_token
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=3000, help="rows of synthetic data")
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args(argv)

    import dataset
    import distill
    from distillation.settings import templates

    os.chdir(REPO)  # the configs name their files relative to the repository root

    TINY.mkdir(parents=True, exist_ok=True)
    generate_tiny_data.main(["--out", str(DATA_FILE), "--n", str(arguments.samples), "--seed", str(arguments.seed)])
    rows = generate_tiny_data.generate(arguments.samples, arguments.seed)
    short = templates.PROMPT_TEMPLATES["alpaca_short"]  # the template configs/tiny*.yaml name
    texts = [dataset.alpaca_prompt(row["instruction"], row["input"], short) + row["output"] for row in rows]
    tokenizer = train_byte_level_tokenizer(texts, VOCAB_SIZE)

    with tempfile.TemporaryDirectory() as work:
        architecture = Path(work) / "architecture"
        teacher_architecture(tokenizer).save_pretrained(architecture)
        tokenizer.save_pretrained(architecture)
        checkpoints = Path(work) / "checkpoints"
        status = distill.main(
            [
                "--config",
                str(TEACHER_CONFIG),
                "--run-name",
                "teacher",
                "--set",
                f"teacher.name={architecture}",
                "--set",
                f"paths.checkpoints={checkpoints}",
            ]
        )
        if status != 0:
            return status
        best = checkpoints / "teacher" / "best"
        shutil.rmtree(TEACHER_DIR, ignore_errors=True)
        TEACHER_DIR.mkdir(parents=True)
        for name in SHIPPED_FILES:
            shutil.copy2(best / name, TEACHER_DIR / name)
        shutil.copy2(checkpoints / "teacher" / "summary.json", TEACHER_DIR / "training_summary.json")
    print(f"wrote {DATA_FILE} and {TEACHER_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
