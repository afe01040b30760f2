"""The original project's experiments: its own config file means what it meant (float32 included, on any machine),
the config of its final code trains pretrained distilgpt2, the README's table of differences says what the code
does, its prompt is Stanford Alpaca's byte for byte, and its untrained truncated student has the tokenizer's
vocabulary (the teacher's extra rows cropped)."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
import yaml
from datasets import Dataset
from transformers import AutoModelForCausalLM, GPT2Config

import dataset
import distill
import models
from distillation.data import batching
from distillation.runtime import hardware
from distillation.settings import templates
from distillation.settings.config import ConfigError, load_config, to_plain_dict
from distillation.training import trainer
from helpers import REPO, check_a_distilled_pretrained_student, save_gpt2, write_config
from loss import DistillationLoss, next_token_cross_entropy

SEED_CONFIG = "configs/seed.yaml"
DISTILGPT2_CONFIG = "configs/seed_distilgpt2.yaml"

# The original's config.yaml, key by key (its repository at commit 7d49214).
SEED_KEYS = {
    "paths": {"data_folder", "token_dataset", "checkpoints"},
    "distilled_model": {"nb_layers"},
    "training_parameters": {
        "learning_rate",
        "nb_epochs",
        "batch_size",
        "checkpoints_name_last",
        "checkpoints_name_best",
        "resume",
        "loss",
    },
    "seed": None,
}


@pytest.fixture
def native_bf16(monkeypatch):
    """This process's device taken for one that multiplies bfloat16 in hardware (a recent GPU, an AMX CPU), where
    `auto` picks bf16: what a file that leaves precision unset must not follow."""
    monkeypatch.setattr(hardware, "has_native_bf16", lambda device: True)
    assert hardware.mixed_precision(load_config(REPO / "configs" / "tiny.yaml", ["hardware.device=cpu"])) == "bf16"


def test_seed_config_file_holds_the_seed_keys_only():
    raw = yaml.safe_load((REPO / SEED_CONFIG).read_text())
    assert set(raw) == set(SEED_KEYS)
    for section, keys in SEED_KEYS.items():
        if keys is not None:
            assert set(raw[section]) == keys, section


def test_seed_config_runs_the_seed_experiment(native_bf16):
    """Each value that reaches the models, the data, the optimizer, the schedule and the precision, from
    configs/seed.yaml, on a machine where `auto` would pick bf16."""
    config = load_config(REPO / SEED_CONFIG)
    assert config.teacher.name == "vicgalle/gpt2-alpaca-gpt4" and config.student.pretrained is None
    assert config.student.init == "random" and config.distilled_model.nb_layers == 6
    assert config.teacher.cache_top_k is None
    assert hardware.mixed_precision(config) == "no" and hardware.teacher_dtype(config) == torch.float32

    spec = dataset.spec_from_config(config)
    assert spec.dataset == "vicgalle/alpaca-gpt4" and spec.text_column is None and spec.seed == 42
    assert spec.template == templates.PROMPT_TEMPLATES["alpaca"] and spec.max_length == 1024
    assert spec.split == (0.6, 0.2, 0.2) and not spec.mask_instruction and spec.max_samples is None
    assert not config.data.group_by_length and not config.data.packing  # batches of random samples

    training = config.training_parameters
    assert (training.batch_size, training.gradient_accumulation_steps, training.nb_epochs) == (2, 1, 10)
    assert training.max_steps is None and training.max_grad_norm is None  # no clipping
    assert training.eval_every_steps is None  # a validation at each epoch's end, as the original's
    criterion = training.loss
    assert isinstance(criterion, DistillationLoss)
    assert (criterion.alpha, criterion.beta, criterion.temperature) == (1.0, 0.1, 1.0)
    assert criterion.divergence == "forward_kl"
    assert (training.checkpoints_name_last, training.checkpoints_name_best) == (
        "checkpoint_last.pth",
        "checkpoint_best.pth",
    )

    student = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    optimizer = trainer.build_optimizer(student, training)
    assert type(optimizer) is torch.optim.SGD
    assert all(
        group["lr"] == 0.001 and group["momentum"] == 0.0 and group["weight_decay"] == 0.0
        for group in optimizer.param_groups
    )
    scheduler = trainer.build_scheduler(optimizer, training, total_steps=50)
    rates = []
    for _ in range(50):  # no warm-up and no decay: the original's fixed learning rate at every step
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates == [0.001] * 50


def test_the_distilgpt2_config_is_the_seed_config_with_pretrained_distilgpt2():
    """The original's final code: every setting of configs/seed.yaml, and distilgpt2 from the Hub as the student."""
    seed, final = load_config(REPO / SEED_CONFIG), load_config(REPO / DISTILGPT2_CONFIG)
    assert final.student.pretrained == "distilgpt2" and final.student.init == "random"
    seed_values, final_values = to_plain_dict(seed), to_plain_dict(final)
    for values in (seed_values, final_values):
        del values["name"], values["student"]
    assert final_values == seed_values


def short_run(config_file: str, tmp_path, data_file, *overrides: str) -> list[str]:
    """distill.py's arguments for a 3-step run of `config_file` on the tests' data, in tmp_path."""
    values = [
        f"data.dataset={data_file}",
        f"paths.data_folder={tmp_path / 'data'}",
        f"paths.checkpoints={tmp_path / 'checkpoints'}",
        "data.template=alpaca_short",
        "data.max_length=64",
        "training_parameters.max_steps=3",
        "training_parameters.sample_prompts=0",
        "training_parameters.report_to=none",
        "hardware.device=cpu",
        *overrides,
    ]
    return [
        "--config",
        str(REPO / config_file),
        "--run-name",
        "run",
        *(argument for value in values for argument in ("--set", value)),
    ]


def test_the_seed_config_trains_in_float32_where_auto_would_pick_bf16(tmp_path, teacher_dir, data_file, native_bf16):
    arguments = short_run(
        SEED_CONFIG, tmp_path, data_file, f"teacher.name={teacher_dir}", "distilled_model.nb_layers=1"
    )
    assert distill.main(arguments) == 0
    run = tmp_path / "checkpoints" / "run"
    assert json.loads((run / "summary.json").read_text())["mixed_precision"] == "no"
    assert "Precision: float32 on cpu; teacher float32;" in (run / "train.log").read_text()
    assert (run / "checkpoint_best.pth" / "model.safetensors").is_file()  # the original's names, as directories
    assert (run / "checkpoint_last.pth" / "model.safetensors").is_file()


def test_the_distilgpt2_config_distils_into_a_pretrained_student_against_a_wider_teacher(
    tmp_path, tokenizer, data_file
):
    """The original's final experiment on tiny stand-ins: a pretrained student with the tokenizer's rows, and a
    teacher with 3 rows more (as vicgalle/gpt2-alpaca-gpt4 against distilgpt2)."""
    teacher = save_gpt2(tmp_path / "teacher", tokenizer, nb_layers=2, vocab_size=len(tokenizer) + 3)
    pretrained = save_gpt2(tmp_path / "distilgpt2", tokenizer, nb_layers=1, seed=5)
    arguments = short_run(
        DISTILGPT2_CONFIG, tmp_path, data_file, f"teacher.name={teacher}", f"student.pretrained={pretrained}"
    )
    assert distill.main(arguments) == 0
    check_a_distilled_pretrained_student(tmp_path / "checkpoints" / "run", teacher, pretrained)


# ---------------------------------------------------------------- the README's table of differences


def difference_table() -> dict[str, tuple[str, str]]:
    """The README's "Differences from the original project" table: row name -> (original's cell, this project's)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    lines = text[text.index("**Differences from the original project**") :].splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("| | original project | here |"))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        name, original, here, _ = (cell.strip() for cell in line.strip().strip("|").split("|"))
        rows[name] = (original, here)
    return rows


# Every difference the original's code shows: none of these rows may go.
REQUIRED_ROWS = {
    "student",
    "teacher",
    "activation",
    "text",
    "end of an answer",
    "tokenized data",
    "split",
    "seed",
    "KD term",
    "CE term, `ClassicLoss`",
    "what is scored",
    "loss weights",
    "teacher's gradients",
    "best checkpoint",
    "resume",
    "normalisation",
    "checkpoints",
    "records",
    "optimizer",
    "batch, epochs",
    "batches",
    "precision",
    "validations",
    "evaluation",
}
ORIGINAL, HERE = 0, 1
ORIGINAL_FILES = (SEED_CONFIG, DISTILGPT2_CONFIG)  # the original's settings
ALL_FILES = (*ORIGINAL_FILES, "config.yaml")


def original_optimizer(config):
    training = config.training_parameters
    plain_sgd = (
        training.optimizer == "sgd"
        and training.momentum == 0
        and training.weight_decay == 0
        and training.lr_scheduler == "constant"
        and training.warmup_steps == 0
        and training.max_grad_norm is None
    )
    return "SGD" if plain_sgd else "not plain SGD", training.learning_rate


def here_optimizer(config):
    training = config.training_parameters
    assert training.optimizer == "adamw"
    return (
        training.learning_rate,
        training.weight_decay,
        training.warmup_steps,
        training.lr_scheduler,
        training.max_grad_norm,
    )


def resolved_precision(config):
    float32 = hardware.mixed_precision(config) == "no" and hardware.teacher_dtype(config) == torch.float32
    return "float32" if float32 else "not float32"


def loss_weights(config):
    criterion = config.training_parameters.loss
    return criterion.alpha, criterion.beta, criterion.temperature


# (row, column, pattern whose groups the cell states, the config files it describes, the same values from a config)
CLAIMS = [
    (
        "student",
        ORIGINAL,
        r"GPT-2's config with (\d+) layers",
        (SEED_CONFIG, "config.yaml"),
        lambda config: config.distilled_model.nb_layers if config.student.pretrained is None else None,
    ),
    (
        "student",
        HERE,
        r"pretrained `([\w-]+)` in `configs/seed_distilgpt2.yaml`",
        (DISTILGPT2_CONFIG,),
        lambda config: config.student.pretrained,
    ),
    (
        "teacher",
        ORIGINAL,
        r"^`([\w-]+/[\w.-]+)`, (float32)",
        ORIGINAL_FILES,
        lambda config: (config.teacher.name, resolved_precision(config)),
    ),
    ("teacher", ORIGINAL, r"^`([\w-]+/[\w.-]+)`", ("config.yaml",), lambda config: config.teacher.name),
    ("text", ORIGINAL, r"padded to (\d+)", ALL_FILES, lambda config: config.data.max_length),
    (
        "text",
        HERE,
        r"`data.template: (\w+)`.*cut at (\d+)",
        ALL_FILES,
        lambda config: (config.data.template, config.data.max_length),
    ),
    (
        "tokenized data",
        HERE,
        r"`([\w.]+)/` with `configs/seed.yaml`",
        (SEED_CONFIG,),
        lambda config: config.paths.token_dataset,
    ),
    (
        "split",
        ORIGINAL,
        r"(\d+)/(\d+)/(\d+)",
        ALL_FILES,
        lambda config: tuple(round(100 * share) for share in dataclass_values(config.data.split)),
    ),
    ("loss weights", ORIGINAL, r"alpha ([\d.]+), beta ([\d.]+), temperature ([\d.]+)", ALL_FILES, loss_weights),
    (
        "checkpoints",
        HERE,
        r"`([\w.]+)/` with `configs/seed.yaml`",
        ORIGINAL_FILES,
        lambda config: config.training_parameters.checkpoints_name_last,
    ),
    (
        "optimizer",
        ORIGINAL,
        r"(SGD), learning rate ([\d.]+), no schedule, no clipping",
        ORIGINAL_FILES,
        original_optimizer,
    ),
    (
        "optimizer",
        HERE,
        r"AdamW ([\d.e-]+), weight decay ([\d.]+) \(matrices\), (\d+) warm-up steps then (\w+), "
        r"clipping at ([\d.]+)",
        ("config.yaml",),
        here_optimizer,
    ),
    (
        "batch, epochs",
        ORIGINAL,
        r"^(\d+) samples, (\d+) epochs",
        ORIGINAL_FILES,
        lambda config: (
            config.training_parameters.batch_size * config.training_parameters.gradient_accumulation_steps,
            config.training_parameters.nb_epochs,
        ),
    ),
    (
        "batch, epochs",
        HERE,
        r"(\d+) x (\d+) accumulated = (\d+) samples, (\d+) epochs",
        ("config.yaml",),
        lambda config: (
            config.training_parameters.batch_size,
            config.training_parameters.gradient_accumulation_steps,
            config.training_parameters.batch_size * config.training_parameters.gradient_accumulation_steps,
            config.training_parameters.nb_epochs,
        ),
    ),
    (
        "batches",
        ORIGINAL,
        r"^(random) samples$",
        ORIGINAL_FILES,
        lambda config: "random" if not (config.data.group_by_length or config.data.packing) else "grouped or packed",
    ),
    (
        "batches",
        HERE,
        r"(length-grouped)",
        ("config.yaml",),
        lambda config: "length-grouped" if config.data.group_by_length else "random",
    ),
    ("precision", ORIGINAL, r"^(float32) \(", ORIGINAL_FILES, resolved_precision),
    (
        "precision",
        HERE,
        r"`mixed_precision: (\w+)`, `teacher.dtype: (\w+)`",
        ("config.yaml",),
        lambda config: (config.hardware.mixed_precision, config.teacher.dtype),
    ),
    (
        "validations",
        ORIGINAL,
        r"^(each epoch)$",
        ORIGINAL_FILES,
        lambda config: "each epoch" if config.training_parameters.eval_every_steps is None else "more often",
    ),
    (
        "validations",
        HERE,
        r"each epoch and every (\d+) steps",
        ("config.yaml",),
        lambda config: config.training_parameters.eval_every_steps,
    ),
]


def dataclass_values(section) -> list:
    import dataclasses

    return [getattr(section, item.name) for item in dataclasses.fields(section)]


def as_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def test_the_difference_table_lists_every_difference():
    assert REQUIRED_ROWS <= set(difference_table())


@pytest.mark.parametrize(
    "row, column, pattern, files, resolve",
    CLAIMS,
    ids=[f"{claim[0]}-{'original' if claim[1] == ORIGINAL else 'here'}-{index}" for index, claim in enumerate(CLAIMS)],
)
def test_the_difference_table_says_what_the_config_files_resolve_to(native_bf16, row, column, pattern, files, resolve):
    """Each value the table states, read from its cell, against the config files it describes (resolved with
    their defaults, on a machine where `auto` would pick bf16)."""
    cell = difference_table()[row][column]
    match = re.search(pattern, cell)
    assert match, f"the README's {row!r} row no longer says {pattern!r}: {cell}"
    stated = tuple(as_value(group) for group in match.groups())
    for file in files:
        resolved = resolve(load_config(REPO / file))
        assert stated == (resolved if isinstance(resolved, tuple) else (resolved,)), (row, file)


def test_the_activation_row_is_the_models_choice_and_the_same_function():
    original, here = difference_table()["activation"]
    (original_name,) = re.findall(r"`(\w+)`", original)
    here_name = re.findall(r"`(\w+)`", here)[0]
    assert models.FUSED_ACTIVATIONS[original_name] == here_name
    student = models.build_student(GPT2Config(n_layer=2, n_embd=16, n_head=2, activation_function=original_name), 1)
    assert student.config.activation_function == here_name
    values = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    six_operations = 0.5 * values * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (values + 0.044715 * values**3)))
    torch.testing.assert_close(F.gelu(values, approximate="tanh"), six_operations)


def test_the_originals_ce_term_takes_the_positions_as_classes():
    """The CE row: the original's call, cross_entropy(logits[:, :-1], one-hot next tokens), with probability targets
    normalises over dimension 1 (the positions), which is not next-token cross-entropy."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 9, 11, generator=generator)
    ids = torch.randint(0, 11, (2, 9), generator=generator)
    targets = F.one_hot(ids, 11).double()[:, 1:]
    originals = F.cross_entropy(logits[:, :-1], targets)
    over_positions = -(targets * F.log_softmax(logits[:, :-1].double(), dim=1)).sum(dim=1).mean()
    torch.testing.assert_close(originals, over_positions)
    fixed = next_token_cross_entropy(logits, ids)
    over_vocabulary = -F.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).mean()
    torch.testing.assert_close(fixed, over_vocabulary)
    assert abs(originals.item() - fixed.item()) > 0.1


def test_config_yaml_is_the_seed_experiment_with_explicit_choices():
    config = load_config(REPO / "config.yaml")
    seed = load_config(REPO / "configs" / "seed.yaml")
    assert config.teacher.name == seed.teacher.name and config.data.dataset == seed.data.dataset
    assert config.data.template == seed.data.template == "alpaca" and config.data.max_length == 1024
    assert config.distilled_model == seed.distilled_model and config.data.split == seed.data.split
    assert config.training_parameters.loss.spec() == seed.training_parameters.loss.spec()  # alpha 1, beta 0.1, T 1
    # The better choices are written in config.yaml itself, not left to defaults.
    written = yaml.safe_load((REPO / "config.yaml").read_text())
    for key in (
        "optimizer",
        "learning_rate",
        "lr_scheduler",
        "warmup_steps",
        "max_grad_norm",
        "batch_size",
        "gradient_accumulation_steps",
        "nb_epochs",
    ):
        assert key in written["training_parameters"], key
    assert {"group_by_length", "template", "max_length"} <= set(written["data"])


# ---------------------------------------------------------------- the Stanford Alpaca prompt

# The example row of vicgalle/alpaca-gpt4's data set card: its `text` is the prompt with input, then the output.
CARD_ROW = {
    "instruction": "Identify the odd one out.",
    "input": "Twitter, Instagram, Telegram",
    "output": "The odd one out is Telegram. Twitter and Instagram are social media platforms mainly for sharing "
    "information, images and videos while Telegram is a cloud-based instant messaging and voice-over-IP "
    "service.",
}
CARD_TEXT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\nIdentify the odd one out.\n\n### Input:\n"
    "Twitter, Instagram, Telegram\n\n### Response:\n" + CARD_ROW["output"]
)
NO_INPUT_TEXT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nGive three tips for staying healthy.\n\n### Response:\n1. Eat well.\n2. Sleep.\n3. Move."
)


def data_spec(**values) -> dataset.DataSpec:
    """The data settings of config.yaml's defaults (template alpaca), with `values` changed."""
    return dataset.DataSpec(
        **{
            "dataset": "unused",
            "text_column": None,
            "max_length": 1024,
            "split": (0.6, 0.2, 0.2),
            "mask_instruction": False,
            "max_samples": None,
            "seed": 0,
            **values,
        }
    )


def formatted(rows: list[dict], **spec_values) -> list[str]:
    texts = dataset.format_rows(Dataset.from_list(rows), data_spec(**spec_values))
    return [prompt + response for prompt, response in zip(texts["prompt"], texts["response"])]


def test_default_template_renders_the_data_set_text_column_byte_for_byte():
    no_input = {
        "instruction": "Give three tips for staying healthy.",
        "input": "",
        "output": "1. Eat well.\n2. Sleep.\n3. Move.",
    }
    assert formatted([CARD_ROW, no_input]) == [CARD_TEXT, NO_INPUT_TEXT]


def test_fields_are_used_as_they_are():
    """Stanford Alpaca strips nothing: surrounding spaces and newlines stay in the text, as in its `text` column."""
    row = {"instruction": " Say hi. ", "input": "", "output": "\nHi!\n"}
    assert formatted([row]) == [
        NO_INPUT_TEXT.split("### Instruction:")[0] + "### Instruction:\n Say hi. \n\n### Response:\n\nHi!\n"
    ]


def test_a_custom_template_section_formats_both_variants():
    template = {"with_input": "Q: {instruction} ({input})\nA: ", "without_input": "Q: {instruction}\nA: "}
    rows = [
        {"instruction": "2+2?", "input": "integers", "output": "4"},
        {"instruction": "Hi?", "input": "", "output": "Hello"},
    ]
    texts = formatted(rows, template=dataset.prompt_template(template))
    assert texts == ["Q: 2+2? (integers)\nA: 4", "Q: Hi?\nA: Hello"]


@pytest.mark.parametrize(
    "template, problem",
    [
        ("stanford", "use one of alpaca, alpaca_short"),
        ({"with_input": "{instruction}"}, "exactly the keys with_input"),
        ({"with_input": "{instruction} {input}", "without_input": "{instruction} {input}"}, "without_input"),
        ({"with_input": "{instruction} {output}", "without_input": "{instruction}"}, "with_input"),
        ({"with_input": "{instruction", "without_input": "{instruction}"}, "with_input"),
    ],
)
def test_a_wrong_template_is_one_config_sentence(tmp_path, config_values, template, problem):
    config_values["data"]["template"] = template
    with pytest.raises(ConfigError, match=problem) as raised:
        load_config(write_config(tmp_path / "c.yaml", config_values))
    assert "\n" not in str(raised.value)


def test_mask_instruction_targets_the_response_of_the_alpaca_template(tokenizer):
    texts = Dataset.from_dict({"prompt": [CARD_TEXT[: -len(CARD_ROW["output"])]], "response": [CARD_ROW["output"]]})
    sample = dataset.tokenize(texts, tokenizer, data_spec(mask_instruction=True))[0]
    batch = batching.PaddingCollator(tokenizer.eos_token_id, mask_instruction=True)([sample])
    targets = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert tokenizer.decode(targets) == CARD_ROW["output"] + tokenizer.eos_token
    assert sample["input_ids"] == tokenizer(CARD_TEXT)["input_ids"] + [tokenizer.eos_token_id]


# ---------------------------------------------------------------- the student's vocabulary


def test_untrained_student_has_the_tokenizers_vocabulary_and_teacher_rows_are_cropped(tokenizer):
    teacher_config = GPT2Config(vocab_size=len(tokenizer) + 3, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    teacher = AutoModelForCausalLM.from_config(teacher_config).eval()
    student = models.build_student(teacher.config, 1, vocab_size=len(tokenizer))
    assert student.config.vocab_size == len(tokenizer) and student.get_input_embeddings().num_embeddings == len(
        tokenizer
    )
    assert student.config.n_embd == 16 and student.config.n_layer == 1
    models.initialise_from_teacher(student, teacher, [1])
    torch.testing.assert_close(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight[:-3])
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight  # still tied


def test_a_tokenizer_without_offsets_is_one_data_sentence():
    """Where the prompt ends is found from character offsets, which Python-backed tokenizers do not give."""
    from transformers import ByT5Tokenizer

    texts = Dataset.from_dict({"prompt": ["Q: "], "response": ["yes"]})
    with pytest.raises(dataset.DataError, match="gives no character offsets") as raised:
        dataset.tokenize(texts, ByT5Tokenizer(), data_spec(mask_instruction=True))
    assert "\n" not in str(raised.value)
