"""Every user mistake: one sentence naming the key or file and the fix, exit code 2, no traceback, and no file of an
earlier run touched."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import distill
from assets.build_tiny import train_byte_level_tokenizer
from helpers import base_config, save_gpt2, write_config


@dataclass
class Context:
    root: Path
    values: dict
    tokenizer: object

    def config(self, **changes) -> str:
        """Write the base config with `changes` ("section.key": value) applied, and return its path."""
        values = copy.deepcopy(self.values)
        for dotted, value in changes.items():
            *parents, last = dotted.split(".")
            node = values
            for key in parents:
                node = node.setdefault(key, {})
            node[last] = value
        path = self.root / f"case-{hashlib.sha1(repr(changes).encode()).hexdigest()[:8]}.yaml"
        return str(write_config(path, values))

    def data(self, name: str, text: str | bytes) -> str:
        path = self.root / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return str(path)

    def copy_of_earlier_run(self, name: str) -> str:
        shutil.copytree(self.root / "checkpoints" / "earlier", self.root / "checkpoints" / name)
        return name


def config_text_with(context: Context, name: str, extra: str) -> list[str]:
    """The base config's text with `extra` lines after it, as a file `name`."""
    text = Path(context.config()).read_text() + extra
    return ["--config", context.data(name, text)]


def alpaca_lines(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def corrupt_weights(context: Context) -> list[str]:
    name = context.copy_of_earlier_run("corrupt-weights")
    (context.root / "checkpoints" / name / "last" / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    return ["--config", context.config(), "--resume", "--run-name", name]


def truncate_training_state(context: Context) -> list[str]:
    name = context.copy_of_earlier_run("truncated-state")
    path = context.root / "checkpoints" / name / "last" / "training_state.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    return ["--config", context.config(), "--resume", "--run-name", name]


def other_shape(context: Context) -> list[str]:
    name = context.copy_of_earlier_run("other-shape")
    return ["--config", context.config(**{"distilled_model.nb_layers": 2}), "--resume", "--run-name", name]


def other_tokenizer_student(context: Context) -> list[str]:
    texts = ["a completely different corpus of words for another tokenizer"] * 20
    other = train_byte_level_tokenizer(texts, vocab_size=300)
    student = save_gpt2(context.root / "other-student", other, nb_layers=1)
    return ["--config", context.config(**{"student.pretrained": str(student)})]


def hidden_states_of_other_widths(context: Context) -> list[str]:
    student = save_gpt2(context.root / "narrow-student", context.tokenizer, nb_layers=1, width=16)
    return [
        "--config",
        context.config(**{"student.pretrained": str(student), "training_parameters.loss.hidden_weight": 1.0}),
    ]


def on_policy_teacher_without_eos(context: Context) -> list[str]:
    """A teacher whose tokenizer has a padding token but no EOS, for an on-policy run."""
    tokenizer = copy.deepcopy(context.tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.eos_token = None
    teacher = save_gpt2(context.root / "teacher-without-eos", tokenizer, nb_layers=1)
    return ["--config", context.config(**{"teacher.name": str(teacher), "responses.lmbda": 1.0})]


def empty_after_filtering(context: Context) -> list[str]:
    rows = [{"instruction": f"Say nothing {i}.", "input": "", "output": "   "} for i in range(30)]
    return ["--config", context.config(**{"data.dataset": context.data("empty.jsonl", alpaca_lines(rows))})]


GOOD_CHAT = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}


def chat_data(row_two: dict, good: dict = GOOD_CHAT, **changes) -> Callable[[Context], list[str]]:
    """A data file of 30 rows `good`, but the second, `row_two`."""

    def build(context: Context) -> list[str]:
        rows = [good, row_two] + [good] * 28
        path = context.data(f"chat-{hashlib.sha1(repr(row_two).encode()).hexdigest()[:8]}.jsonl", alpaca_lines(rows))
        return ["--config", context.config(**{"data.dataset": path, **changes})]

    return build


def non_utf8(context: Context) -> list[str]:
    text = "".join(f"caf\xe9 line {i}\n" for i in range(30)).encode("latin-1")
    return [
        "--config",
        context.config(**{"data.dataset": context.data("latin1.txt", text), "data.text_column": "text"}),
    ]


# (case id, a fragment the one-sentence message must contain, how to build the command line)
CASES: list[tuple[str, str, Callable[[Context], list[str]]]] = [
    ("missing config file", "does not exist", lambda c: ["--config", str(c.root / "absent.yaml")]),
    (
        "yaml syntax error",
        "not valid YAML at line",
        lambda c: ["--config", c.data("broken.yaml", "seed: 1\npaths: [a\n")],
    ),
    ("unknown section", "unknown key trainer", lambda c: ["--config", c.config(**{"trainer.steps": 3})]),
    ("unknown key", "lerning_rate", lambda c: ["--config", c.config(**{"training_parameters.lerning_rate": 0.1})]),
    ("wrong type", "batch_size", lambda c: ["--config", c.config(**{"training_parameters.batch_size": "eight"})]),
    (
        "number with a typo",
        "learning_rate",
        lambda c: ["--config", c.config(**{"training_parameters.learning_rate": "3e-4x"})],
    ),
    (
        "zero learning rate",
        "learning_rate",
        lambda c: ["--config", c.config(**{"training_parameters.learning_rate": 0})],
    ),
    (
        "negative learning rate",
        "learning_rate",
        lambda c: ["--config", c.config(**{"training_parameters.learning_rate": -0.1})],
    ),
    ("zero batch size", "batch_size", lambda c: ["--config", c.config(**{"training_parameters.batch_size": 0})]),
    ("unknown tracker", "report_to", lambda c: ["--config", c.config(**{"training_parameters.report_to": "mlflow"})]),
    (
        "tracker not installed",
        "pip install wandb",
        lambda c: ["--config", c.config(**{"training_parameters.report_to": "wandb"})],
    ),
    ("negative epochs", "nb_epochs", lambda c: ["--config", c.config(**{"training_parameters.nb_epochs": -2})]),
    ("zero epochs", "nb_epochs", lambda c: ["--config", c.config(**{"training_parameters.nb_epochs": 0})]),
    (
        "zero temperature",
        "temperature",
        lambda c: ["--config", c.config(**{"training_parameters.loss.temperature": 0})],
    ),
    (
        "negative temperature",
        "temperature",
        lambda c: ["--config", c.config(**{"training_parameters.loss.temperature": -1})],
    ),
    (
        "alpha and beta both 0",
        "both 0",
        lambda c: ["--config", c.config(**{"training_parameters.loss.alpha": 0, "training_parameters.loss.beta": 0})],
    ),
    ("misspelt loss argument", "alpah", lambda c: ["--config", c.config(**{"training_parameters.loss.alpah": 1})]),
    (
        "loss class that does not exist",
        "NoSuchLoss",
        lambda c: ["--config", c.config(**{"training_parameters.loss": {"()": "loss.NoSuchLoss"}})],
    ),
    ("zero layers", "nb_layers", lambda c: ["--config", c.config(**{"distilled_model.nb_layers": 0})]),
    (
        "more layers than the teacher",
        "nb_layers is 3",
        lambda c: ["--config", c.config(**{"distilled_model.nb_layers": 3})],
    ),
    (
        "data file missing",
        "missing.jsonl",
        lambda c: ["--config", c.config(**{"data.dataset": str(c.root / "missing.jsonl")})],
    ),
    ("text column absent", "body", lambda c: ["--config", c.config(**{"data.text_column": "body"})]),
    ("data empty after filtering", "no non-empty sample", empty_after_filtering),
    (
        "conversation column as text_column",
        "text_column: null",
        chat_data(
            {"messages": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}]},
            **{"data.text_column": "messages"},
        ),
    ),
    (
        "turn without content",
        "row 2",
        chat_data({"messages": [{"role": "user"}, {"role": "assistant", "content": "B"}]}),
    ),
    (
        "unknown role",
        "'tool'",
        chat_data({"messages": [{"role": "tool", "content": "A"}, {"role": "assistant", "content": "B"}]}),
    ),
    (
        "unknown ShareGPT speaker",
        "'narrator'",
        chat_data(
            {"conversations": [{"from": "narrator", "value": "A"}]},
            {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]},
        ),
    ),
    ("empty conversation", "row 2 of", chat_data({"messages": []})),
    (
        "file mixing two formats",
        "row 2 of",
        chat_data({"instruction": "A", "input": "", "output": "B"}),
    ),
    (
        "every prompt longer than max_length",
        "raise data.max_length",
        lambda c: ["--config", c.config(**{"data.max_length": 8, "data.mask_instruction": True})],
    ),
    (
        "conversation without an answer",
        "no assistant turn",
        chat_data({"messages": [{"role": "user", "content": "A"}]}),
    ),
    (
        "no known data format",
        "none of the formats",
        chat_data({"question": "A", "answer": "B"}, {"question": "C", "answer": "D"}),
    ),
    ("non-UTF-8 text file", "latin1.txt is not UTF-8", non_utf8),
    ("splits not summing to 1", "sum to", lambda c: ["--config", c.config(**{"data.split.test": 0.5})]),
    ("max length above positions", "max_length", lambda c: ["--config", c.config(**{"data.max_length": 100000})]),
    ("tokenizers differ", "different tokenizers", other_tokenizer_student),
    (
        "teacher not found",
        "teacher.name",
        lambda c: ["--config", c.config(**{"teacher.name": str(c.root / "no-teacher")})],
    ),
    (
        "resume with no checkpoint",
        "no checkpoint to resume",
        lambda c: ["--config", c.config(), "--resume", "--run-name", "ghost"],
    ),
    ("checkpoint of another shape", "another model shape", other_shape),
    ("corrupted safetensors", "model.safetensors", corrupt_weights),
    ("truncated training state", "training_state.pt", truncate_training_state),
    (
        "--set of an unknown key",
        "unknown key training_parameters.epochs",
        lambda c: ["--config", c.config(), "--set", "training_parameters.epochs=3"],
    ),
    (
        "run name escaping the checkpoints folder",
        "--run-name",
        lambda c: ["--config", c.config(), "--run-name", "../x"],
    ),
    ("existing run without --resume", "already exists", lambda c: ["--config", c.config(), "--run-name", "earlier"]),
    ("fp16 without CUDA", "fp16", lambda c: ["--config", c.config(**{"hardware.mixed_precision": "fp16"})]),
    ("cuda on a machine without it", "cuda", lambda c: ["--config", c.config(**{"hardware.device": "cuda"})]),
    (
        "unknown divergence",
        "divergence",
        lambda c: ["--config", c.config(**{"training_parameters.loss.divergence": "kl"})],
    ),
    ("hidden states of other widths", "hidden_weight", hidden_states_of_other_widths),
    (
        "teacher block out of range",
        "teacher",
        lambda c: ["--config", c.config(**{"student.init": "teacher_layers", "student.teacher_layers": [5]})],
    ),
    ("seed below numpy's range", "seed is -1", lambda c: ["--config", c.config(**{"seed": -1})]),
    (
        "seed above numpy's range",
        "from 0 to 4294967295",
        lambda c: ["--config", c.config(), "--set", f"seed={2**32}"],
    ),
    (
        "infinite temperature",
        "temperature must be a finite number",
        lambda c: ["--config", c.config(), "--set", "training_parameters.loss.temperature=.inf"],
    ),
    ("section written twice", "seed is written twice", lambda c: config_text_with(c, "twice.yaml", "seed: 4\n")),
    (
        "!import of a missing file",
        "`!import nowhere.yaml`",
        lambda c: config_text_with(c, "import.yaml", "hub: !import nowhere.yaml\n"),
    ),
    (
        "cached teacher's top k above the vocabulary",
        "teacher.cache_top_k is 401 but the student's vocabulary has 400 tokens",
        lambda c: [
            "--config",
            c.config(**{"teacher.cache_top_k": 401, "training_parameters.loss.temperature": 1.0}),
        ],
    ),
    (
        "cached teacher at another temperature",
        "cache_top_k",
        lambda c: ["--config", c.config(**{"teacher.cache_top_k": 4})],
    ),
    ("lmbda above 1", "responses.lmbda", lambda c: ["--config", c.config(**{"responses.lmbda": 1.5})]),
    ("lmbda below 0", "responses.lmbda", lambda c: ["--config", c.config(**{"responses.lmbda": -0.1})]),
    (
        "generation setting of the wrong type",
        "responses.temperature",
        lambda c: ["--config", c.config(**{"responses.lmbda": 1.0, "responses.temperature": "hot"})],
    ),
    (
        "top_k not a whole number",
        "responses.top_k",
        lambda c: ["--config", c.config(**{"responses.lmbda": 1.0, "responses.top_k": 2.5})],
    ),
    (
        "max_new_tokens past the model's positions",
        "responses.max_new_tokens is 128",
        lambda c: ["--config", c.config(**{"responses.lmbda": 1.0, "responses.max_new_tokens": 128})],
    ),
    ("tokenizer without EOS for an on-policy run", "no EOS token", on_policy_teacher_without_eos),
    (
        "on-policy without a teacher",
        "has no teacher",
        lambda c: [
            "--config",
            c.config(**{"responses.lmbda": 0.5, "training_parameters.loss": {"()": "loss.ClassicLoss"}}),
        ],
    ),
    (
        "on-policy on whole texts without prompts",
        "without a prompt part",
        lambda c: ["--config", c.config(**{"responses.seq_kd": True, "data.text_column": "instruction"})],
    ),
    (
        "on-policy with the cached teacher",
        "teacher.cache_top_k caches",
        lambda c: [
            "--config",
            c.config(**{"responses.lmbda": 1.0, "teacher.cache_top_k": 4, "training_parameters.loss.temperature": 1.0}),
        ],
    ),
    (
        "best checkpoint by ROUGE-L without generation prompts",
        "generation_prompts is 0",
        lambda c: ["--config", c.config(**{"training_parameters.best_metric": "rouge_l"})],
    ),
]


def tree_digest(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def context(tmp_path_factory, teacher_dir, data_file, tokenizer) -> Context:
    root = tmp_path_factory.mktemp("bad-inputs")
    values = base_config(root, teacher_dir, data_file)
    values["training_parameters"]["max_steps"] = 2
    earlier = Context(root, values, tokenizer)
    assert distill.main(["--config", earlier.config(), "--run-name", "earlier"]) == 0
    return earlier


def test_the_table_covers_at_least_25_mistakes():
    assert len(CASES) >= 25


@pytest.mark.parametrize("fragment, build", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_one_sentence_exit_2_and_harms_nothing(context, capsys, fragment, build):
    if "cuda" in fragment and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    earlier = context.root / "checkpoints" / "earlier"
    before, runs_before = tree_digest(earlier), set((context.root / "checkpoints").iterdir())
    arguments = build(context)
    runs_prepared = set((context.root / "checkpoints").iterdir())

    assert distill.main(arguments) == 2

    printed = capsys.readouterr().err
    errors = [line for line in printed.splitlines() if " error: " in line]
    assert len(errors) == 1, printed
    message = errors[0].split(" error: ", 1)[1]
    assert fragment in message
    assert "; " in message  # the problem; then the fix
    assert "Traceback" not in printed
    assert tree_digest(earlier) == before
    assert set((context.root / "checkpoints").iterdir()) == runs_prepared  # no new run directory
    assert runs_prepared >= runs_before


def test_a_relative_teacher_path_from_another_directory_names_where_it_was_looked_for(
    context, capsys, teacher_dir, tmp_path, monkeypatch
):
    """Relative paths are read from the current directory, not the config file's folder: a run started elsewhere
    is told so, not told to set teacher.name to the value it already has."""
    beside_config = context.root / "assets" / "tiny" / "teacher"
    beside_config.parent.mkdir(parents=True, exist_ok=True)
    if not beside_config.exists():
        beside_config.symlink_to(teacher_dir)
    config = context.config(**{"teacher.name": "assets/tiny/teacher"})
    monkeypatch.chdir(tmp_path)

    assert distill.main(["--config", config]) == 2

    errors = [line for line in capsys.readouterr().err.splitlines() if " error: " in line]
    assert len(errors) == 1
    assert "teacher.name is assets/tiny/teacher, which is not a Hugging Face Hub name" in errors[0]
    assert f"read from the current directory, {tmp_path}" in errors[0]
    assert "set teacher.name (and student.pretrained) to a local directory" not in errors[0]
    assert list(tmp_path.iterdir()) == []
