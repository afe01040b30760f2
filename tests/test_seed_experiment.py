"""The seed project's experiment: its own config file means what the seed meant, its prompt is Stanford Alpaca's byte
for byte, and its untrained truncated student has the tokenizer's vocabulary (the teacher's extra rows cropped)."""

from __future__ import annotations

import pytest
import torch
import yaml
from datasets import Dataset
from transformers import AutoModelForCausalLM, GPT2Config

import batching
import dataset
import models
import trainer
from config import ConfigError, load_config
from helpers import REPO, write_config
from loss import DistillationLoss

# The seed's config.yaml, key by key (the seed project's repository).
SEED_KEYS = {
    "paths": {"data_folder", "token_dataset", "checkpoints"},
    "distilled_model": {"nb_layers"},
    "training_parameters": {"learning_rate", "nb_epochs", "batch_size", "checkpoints_name_last",
                            "checkpoints_name_best", "resume", "loss"},
    "seed": None,
}


def test_seed_config_file_holds_the_seed_keys_only():
    raw = yaml.safe_load((REPO / "configs" / "seed.yaml").read_text())
    assert set(raw) == set(SEED_KEYS)
    for section, keys in SEED_KEYS.items():
        if keys is not None:
            assert set(raw[section]) == keys, section


def test_seed_config_runs_the_seed_experiment():
    """Each value that reaches the models, the data, the optimizer and the schedule, from configs/seed.yaml."""
    config = load_config(REPO / "configs" / "seed.yaml")
    assert config.teacher.name == "vicgalle/gpt2-alpaca-gpt4" and config.student.pretrained is None
    assert config.student.init == "random" and config.distilled_model.nb_layers == 6
    assert config.teacher.cache_top_k is None

    spec = dataset.spec_from_config(config)
    assert spec.dataset == "vicgalle/alpaca-gpt4" and spec.text_column is None and spec.seed == 42
    assert spec.template == dataset.PROMPT_TEMPLATES["alpaca"] and spec.max_length == 1024
    assert spec.split == (0.6, 0.2, 0.2) and not spec.mask_instruction and spec.max_samples is None
    assert not config.data.group_by_length and not config.data.packing  # batches of random samples

    training = config.training_parameters
    assert (training.batch_size, training.gradient_accumulation_steps, training.nb_epochs) == (2, 1, 10)
    assert training.max_steps is None and training.max_grad_norm is None  # no clipping
    criterion = training.loss.build()
    assert isinstance(criterion, DistillationLoss)
    assert (criterion.alpha, criterion.beta, criterion.temperature) == (1.0, 0.1, 1.0)
    assert criterion.divergence == "forward_kl"
    assert (training.checkpoints_name_last, training.checkpoints_name_best) == ("checkpoint_last.pth",
                                                                               "checkpoint_best.pth")

    student = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    optimizer = trainer.build_optimizer(student, training)
    assert type(optimizer) is torch.optim.SGD
    assert all(group["lr"] == 0.001 and group["momentum"] == 0.0 and group["weight_decay"] == 0.0
               for group in optimizer.param_groups)
    scheduler = trainer.build_scheduler(optimizer, training, total_steps=50)
    rates = []
    for _ in range(50):  # no warm-up and no decay: the seed's fixed learning rate at every step
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates == [0.001] * 50


def test_config_yaml_is_the_seed_experiment_with_explicit_choices():
    config = load_config(REPO / "config.yaml")
    seed = load_config(REPO / "configs" / "seed.yaml")
    assert config.teacher.name == seed.teacher.name and config.data.dataset == seed.data.dataset
    assert config.data.template == seed.data.template == "alpaca" and config.data.max_length == 1024
    assert config.distilled_model == seed.distilled_model and config.data.split == seed.data.split
    assert config.training_parameters.loss.build().spec() == seed.training_parameters.loss.build().spec()  # alpha 1, beta 0.1, T 1
    # The better choices are written in config.yaml itself, not left to defaults.
    written = yaml.safe_load((REPO / "config.yaml").read_text())
    for key in ("optimizer", "learning_rate", "lr_scheduler", "warmup_steps", "max_grad_norm", "batch_size",
                "gradient_accumulation_steps", "nb_epochs"):
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
    return dataset.DataSpec(**{"dataset": "unused", "text_column": None, "max_length": 1024, "split": (0.6, 0.2, 0.2),
                               "mask_instruction": False, "max_samples": None, "seed": 0, **values})


def formatted(rows: list[dict], **spec_values) -> list[str]:
    texts = dataset.format_rows(Dataset.from_list(rows), data_spec(**spec_values))
    return [prompt + response for prompt, response in zip(texts["prompt"], texts["response"])]


def test_default_template_renders_the_data_set_text_column_byte_for_byte():
    no_input = {"instruction": "Give three tips for staying healthy.", "input": "",
                "output": "1. Eat well.\n2. Sleep.\n3. Move."}
    assert formatted([CARD_ROW, no_input]) == [CARD_TEXT, NO_INPUT_TEXT]


def test_fields_are_used_as_they_are():
    """Stanford Alpaca strips nothing: surrounding spaces and newlines stay in the text, as in its `text` column."""
    row = {"instruction": " Say hi. ", "input": "", "output": "\nHi!\n"}
    assert formatted([row]) == [NO_INPUT_TEXT.split("### Instruction:")[0]
                                + "### Instruction:\n Say hi. \n\n### Response:\n\nHi!\n"]


def test_a_custom_template_section_formats_both_variants():
    template = {"with_input": "Q: {instruction} ({input})\nA: ", "without_input": "Q: {instruction}\nA: "}
    rows = [{"instruction": "2+2?", "input": "integers", "output": "4"}, {"instruction": "Hi?", "input": "",
                                                                         "output": "Hello"}]
    texts = formatted(rows, template=dataset.prompt_template(template))
    assert texts == ["Q: 2+2? (integers)\nA: 4", "Q: Hi?\nA: Hello"]


@pytest.mark.parametrize("template, problem", [
    ("stanford", "use one of alpaca, alpaca_short"),
    ({"with_input": "{instruction}"}, "exactly the keys with_input"),
    ({"with_input": "{instruction} {input}", "without_input": "{instruction} {input}"}, "without_input"),
    ({"with_input": "{instruction} {output}", "without_input": "{instruction}"}, "with_input"),
    ({"with_input": "{instruction", "without_input": "{instruction}"}, "with_input"),
])
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
    assert student.config.vocab_size == len(tokenizer) and student.get_input_embeddings().num_embeddings == len(tokenizer)
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
