"""The prompts that responses are generated from: where each format's prompt ends (`batching.response_start`) in
real tokenized samples; prompt-only data (a `prompt` column, or conversations without an answer) read for the runs
whose every step generates, its validation and test references answered by the teacher, and refused elsewhere."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
from test_chat_data import PLAIN_TEMPLATE, own_template_tokenizer, spec, write_jsonl

import dataset
import distill
from distillation.data import batching
from distillation.settings.config import load_config
from helpers import SHORT, save_gpt2, write_config

MAX_NEW_TOKENS = 6


def pairs_of(rows: list[dict], count: int = 10) -> list[tuple[str, str]]:
    """(instruction, answer) of `count` of the fixture's short rows (no sample is cut at max_length)."""
    return [(row["instruction"], row["output"]) for row in rows if len(row["instruction"] + row["output"]) < 150][
        :count
    ]


def alpaca_prompt(user: str) -> str:
    return dataset.alpaca_prompt(user, "", SHORT)


def plain_prompt(user: str) -> str:
    """PLAIN_TEMPLATE's rendering of a user turn with its generation prompt."""
    return f"<|user|>\n{user}\n<|assistant|>\n"


def answered_files(pairs, eos: str) -> dict[str, tuple[list[dict], list[str], list[str]]]:
    """Files with responses in each format: (rows, each row's prompt text, each row's response text), the texts
    written out here."""
    files = {
        "alpaca with input": (
            [{"instruction": user, "input": "Some input.", "output": answer} for user, answer in pairs],
            [dataset.alpaca_prompt(user, "Some input.", SHORT) for user, _ in pairs],
            [answer + eos for _, answer in pairs],
        ),
        "sharegpt": (
            [{"conversations": [{"from": "human", "value": u}, {"from": "gpt", "value": a}]} for u, a in pairs],
            [alpaca_prompt(user) for user, _ in pairs],
            [answer + eos for _, answer in pairs],
        ),
        "prompt/completion": (
            [{"prompt": user, "completion": answer} for user, answer in pairs],
            [alpaca_prompt(user) for user, _ in pairs],
            [answer + eos for _, answer in pairs],
        ),
        # The prompt is the conversation up to its LAST answer, the earlier answer included.
        "messages, two answers": (
            [
                {
                    "messages": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Hi."},
                        {"role": "assistant", "content": "Hello."},
                        {"role": "user", "content": user},
                        {"role": "assistant", "content": answer},
                    ]
                }
                for user, answer in pairs
            ],
            ["Be brief.\n\n" + alpaca_prompt("Hi.") + "Hello." + eos + alpaca_prompt(user) for user, _ in pairs],
            [answer + eos for _, answer in pairs],
        ),
        "conversational prompt/completion": (
            [
                {
                    "prompt": [{"role": "user", "content": user}],
                    "completion": [{"role": "assistant", "content": answer}],
                }
                for user, answer in pairs
            ],
            [alpaca_prompt(user) for user, _ in pairs],
            [answer + eos for _, answer in pairs],
        ),
    }
    return files


def prompt_only_files(pairs, render, exchange: str) -> dict[str, tuple[list[dict], list[str]]]:
    """Prompt-only files: (rows, each row's prompt as the template renders it with its generation prompt);
    `exchange` is the template's rendering of the earlier exchange Hi./Hello."""
    earlier = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
    return {
        "prompt column of texts": ([{"prompt": user} for user, _ in pairs], [render(user) for user, _ in pairs]),
        "prompt column of turns": (
            [{"prompt": [*earlier, {"role": "user", "content": user}]} for user, _ in pairs],
            [exchange + render(user) for user, _ in pairs],
        ),
        "messages ending with a user turn": (
            [{"messages": [{"role": "user", "content": user}]} for user, _ in pairs],
            [render(user) for user, _ in pairs],
        ),
    }


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def every_sample(splits):
    for name in dataset.SPLIT_NAMES:
        yield from splits[name]


def test_each_formats_prompt_ends_where_its_response_starts(tmp_path, tokenizer, rows):
    """Samples with responses, tokenized by prepare_splits: the ids before `response_start` are the tokens of the
    prompt written out here (Alpaca's; the chat template's up to the last answer), the ids after it those of the
    response and its EOS."""
    eos = tokenizer.eos_token
    pairs = pairs_of(rows)
    cases = answered_files(pairs, eos)
    own = own_template_tokenizer(tokenizer, PLAIN_TEMPLATE)  # the tokenizer's template, without generation tags
    cases["messages, own template"] = (
        cases["sharegpt"][0],
        [plain_prompt(user) for user, _ in pairs],
        [answer + eos for _, answer in pairs],
    )
    for name, (records, prompts, responses) in cases.items():
        path = write_jsonl(tmp_path / f"{name.replace(' ', '-').replace('/', '-')}.jsonl", records)
        encoder = own if name == "messages, own template" else tokenizer
        splits = dataset.prepare_splits(spec(path, max_length=128), encoder, str(tmp_path / "data"), "tokenized")
        expected = {tuple(ids_of(tokenizer, p + r)): (p, r) for p, r in zip(prompts, responses)}
        assert sum(len(splits[split]) for split in dataset.SPLIT_NAMES) == len(pairs), name
        for sample in every_sample(splits):
            prompt, response = expected[tuple(sample["input_ids"])]
            start = batching.response_start(sample)
            assert sample["input_ids"][:start] == ids_of(tokenizer, prompt), name
            assert sample["input_ids"][start:] == ids_of(tokenizer, response), name
        assert dataset.prompt_only_samples(splits["train"]) == 0


def test_prompt_only_files_are_prompts_with_the_generation_prompt_and_no_target(tmp_path, tokenizer, rows):
    """A prompt column (texts or turns) or conversations ending with a user turn: each sample is its prompt as the
    template renders it for the assistant's answer (the Alpaca one: the prompt without input, ending with the
    response header; a tokenizer's own: its generation prompt appended), with no target, whatever
    mask_instruction; a prompt that does not fit max_length with room for an answer is dropped, not cut."""
    pairs, eos = pairs_of(rows), tokenizer.eos_token
    own = own_template_tokenizer(tokenizer, PLAIN_TEMPLATE)
    exchanges = {
        alpaca_prompt: alpaca_prompt("Hi.") + "Hello." + eos,
        plain_prompt: "<|user|>\nHi.\n<|assistant|>\nHello." + eos,
    }
    for encoder, render in ((tokenizer, alpaca_prompt), (own, plain_prompt)):
        for name, (records, prompts) in prompt_only_files(pairs, render, exchanges[render]).items():
            path = write_jsonl(tmp_path / f"{name.replace(' ', '-')}.jsonl", records)
            expected = {tuple(ids_of(tokenizer, prompt)) for prompt in prompts}
            for mask_instruction in (True, False) if encoder is tokenizer else (True,):
                splits = dataset.prepare_splits(
                    spec(path, max_length=128, mask_instruction=mask_instruction),
                    encoder,
                    str(tmp_path / "data"),
                    "tokenized",
                )
                assert {tuple(sample["input_ids"]) for sample in every_sample(splits)} == expected, name
                for sample in every_sample(splits):
                    assert batching.response_start(sample) == sample["prompt_length"] == sample["length"]
                    assert not any(sample["target_mask"])
                for split in dataset.SPLIT_NAMES:
                    assert dataset.prompt_only_samples(splits[split]) == len(splits[split]) > 0

    lengths = sorted(len(ids_of(tokenizer, alpaca_prompt(user))) for user, _ in pairs)
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": user} for user, _ in pairs])
    limit = lengths[5]  # prompts of limit tokens or more leave no room for an answer
    for mask_instruction in (True, False):
        data_spec = spec(path, max_length=limit, mask_instruction=mask_instruction)
        splits = dataset.prepare_splits(data_spec, tokenizer, str(tmp_path / "data"), "tokenized")
        kept = sorted(sample["length"] for sample in every_sample(splits))
        assert kept == [length for length in lengths if length < limit]
    with pytest.raises(dataset.DataError, match=r"leaves no room for an answer in data.max_length \d+ tokens.*; raise"):
        dataset.prepare_splits(spec(path, max_length=lengths[0]), tokenizer, str(tmp_path / "data"), "tokenized")


def test_a_mixed_file_keeps_its_answered_samples_as_they_were(tmp_path, tokenizer, rows):
    """Conversations without an answer among answered ones: the answered samples are those of the file without
    them (same ids and masks), the others prompt-only samples."""
    pairs = pairs_of(rows, 20)
    answered = [
        {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}
        for user, answer in pairs
    ]
    mixed = answered[:10] + [{"messages": [{"role": "user", "content": user}]} for user, _ in pairs[10:]]
    only_answered = dataset.prepare_splits(
        spec(write_jsonl(tmp_path / "answered.jsonl", answered[:10]), max_length=128),
        tokenizer,
        str(tmp_path / "data"),
        "tokenized",
    )
    both = dataset.prepare_splits(
        spec(write_jsonl(tmp_path / "mixed.jsonl", mixed), max_length=128), tokenizer, str(tmp_path / "data"), "t"
    )
    by_ids = {tuple(sample["input_ids"]): sample for sample in every_sample(both)}
    for sample in every_sample(only_answered):
        assert by_ids[tuple(sample["input_ids"])] == sample
    assert sum(dataset.prompt_only_samples(both[split]) for split in dataset.SPLIT_NAMES) == 10


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory, rows) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    return write_jsonl(path, [{"prompt": row["instruction"]} for row in rows[:40]])


def on_policy_values(config_values: dict, data: Path, **responses) -> dict:
    values = copy.deepcopy(config_values)
    values["data"].update({"dataset": str(data), "mask_instruction": True})
    values["responses"] = {"lmbda": 1.0, "max_new_tokens": MAX_NEW_TOKENS, **responses}
    return values


def greedy_tokens(teacher, ids: list[int], start: int, vocab_size: int) -> list[int]:
    """The teacher's most likely token after each prefix ids[:i], i from `start` to the end, from one forward pass
    over the whole sequence (no cache, no batch, no padding): a greedy answer is these tokens."""
    with torch.no_grad():
        logits = teacher(torch.tensor([ids])).logits[0, start - 1 : -1, :vocab_size]
    return logits.argmax(dim=-1).tolist()


def test_prompt_only_validation_and_test_are_answered_by_the_teacher(
    tmp_path, config_values, prompt_file, teacher_dir, tokenizer, caplog
):
    """At setup, each validation and test prompt is followed by the teacher's greedy answer (computed here
    independently), marked as its response; the validation figures read them: as many target tokens as answer
    tokens. The training split keeps its prompts."""
    from transformers import AutoModelForCausalLM

    config = load_config(write_config(tmp_path / "c.yaml", on_policy_values(config_values, prompt_file)))
    data_spec = dataset.spec_from_config(config)
    tokenized = dataset.prepare_splits(data_spec, tokenizer, config.paths.data_folder, config.paths.token_dataset)
    with caplog.at_level(logging.INFO):
        trainer = distill.setup(config, "answered", False)
    (said,) = [record.getMessage() for record in caplog.records if "no reference responses" in record.getMessage()]
    assert "validation and test" in said and "teacher's greedy answers" in said

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    eos, vocab_size = tokenizer.eos_token_id, len(tokenizer)
    answer_tokens = 0
    for name in ("validation", "test"):
        answered = trainer.batches.loaders[name].dataset
        assert len(answered) == len(tokenized[name])
        for prompt_sample, sample in zip(tokenized[name], answered):
            prompt = prompt_sample["input_ids"]
            answer = sample["input_ids"][len(prompt) :]
            assert sample["input_ids"][: len(prompt)] == prompt
            assert answer == greedy_tokens(teacher, sample["input_ids"], len(prompt), vocab_size)
            # It ends at its first EOS, or after max_new_tokens.
            assert eos not in answer[:-1] and (answer[-1] == eos or len(answer) == MAX_NEW_TOKENS)
            assert sample["target_mask"] == [False] * len(prompt) + [True] * len(answer)
            assert batching.response_start(sample) == sample["prompt_length"] == len(prompt)
            assert sample["length"] == len(prompt) + len(answer)
            answer_tokens += len(answer) if name == "validation" else 0
    assert trainer.batches.loaders["train"].dataset["input_ids"] == tokenized["train"]["input_ids"]
    assert trainer.evaluate("validation")["target_tokens"] == answer_tokens


def refusal(capsys, arguments: list[str], checkpoints: Path) -> str:
    """The one sentence of a refused command (exit 2, no traceback, no run directory left)."""
    assert distill.main(arguments) == 2
    printed = capsys.readouterr().err
    errors = [line.split(" error: ", 1)[1] for line in printed.splitlines() if " error: " in line]
    assert len(errors) == 1 and "; " in errors[0] and "Traceback" not in printed, printed
    assert not checkpoints.exists() or list(checkpoints.iterdir()) == []
    return errors[0]


def test_data_without_the_prompts_or_responses_a_run_needs_is_refused(
    tmp_path, config_values, prompt_file, rows, tokenizer, capsys
):
    """One sentence and exit 2, naming the fix: prompt-only data where a step trains on the data's responses
    (lmbda below 1 without seq_kd) or before a plain baseline; a run that generates on data without prompts (a
    text column; a chat template that makes every token a target; conversations without mask_instruction, whose
    samples lose where their answer starts)."""
    checkpoints = Path(config_values["paths"]["checkpoints"])

    def command(values: dict, *extra: str) -> list[str]:
        return ["--config", str(write_config(tmp_path / "refused.yaml", values)), *extra]

    mixed = on_policy_values(config_values, prompt_file, lmbda=0.5)
    said = refusal(capsys, command(mixed), checkpoints)
    assert "have no response" in said and "set responses.lmbda: 1 or responses.seq_kd: true" in said

    baseline = on_policy_values(config_values, prompt_file)
    said = refusal(capsys, command(baseline, "--plain-baseline"), checkpoints)
    assert said.startswith("--plain-baseline trains the student on the data's responses") and "drop" in said

    text = on_policy_values(config_values, prompt_file)
    text["data"].update({"text_column": "prompt", "mask_instruction": False})
    assert "data.text_column 'prompt' holds whole texts" in refusal(capsys, command(text), checkpoints)

    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}
            for user, answer in pairs_of(rows, 40)
        ],
    )
    unmasked = on_policy_values(config_values, chat)
    unmasked["data"]["mask_instruction"] = False
    assert "set data.mask_instruction: true" in refusal(capsys, command(unmasked), checkpoints)

    # A template that marks the whole conversation as the assistant's: no sample has a prompt part.
    every_token = own_template_tokenizer(tokenizer, "{% generation %}" + PLAIN_TEMPLATE + "{% endgeneration %}")
    teacher = save_gpt2(tmp_path / "every-token-teacher", every_token, nb_layers=2)
    marked = on_policy_values(config_values, chat)
    marked["teacher"]["name"] = str(teacher)
    assert "have no prompt part" in refusal(capsys, command(marked), checkpoints)


def test_a_prompt_only_file_says_what_it_is_when_a_prompt_ends_with_an_answer(tmp_path, tokenizer):
    rows = [{"prompt": [{"role": "user", "content": "Hi."}]}] * 9
    rows.insert(3, {"prompt": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]})
    with pytest.raises(dataset.DataError, match=r"prompt of row 4 of .* ends with a turn of the assistant.*; end"):
        dataset.prepare_splits(spec(write_jsonl(tmp_path / "p.jsonl", rows)), tokenizer, str(tmp_path / "d"), "t")
