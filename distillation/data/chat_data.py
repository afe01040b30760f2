"""Chat data: conversations as people bring them (`messages`, ShareGPT `conversations`, `prompt`/`completion`),
read into one `messages` column of role/content turns, rendered with a chat template and tokenized with a mask of
the assistant turns' tokens.

Prompt-only rows (a `prompt` column without completions, or a conversation with no assistant turn that ends with a
user turn) are read as conversations to be continued: rendered with the template's generation prompt, without a
target; only runs that generate every step's responses train on them (responses.check_prompt_data).

formats.py decides the format (from the columns, FORMAT_COLUMNS, then the first row); dataset.py calls `to_messages`
when formatting the rows and `tokenize_conversations` when tokenizing them; the template that renders them (`rendering_template`) is part of the
tokenized-data cache key. Any malformed conversation is a DataError naming its row (counted from 1).
"""

from __future__ import annotations

import json
import re
from typing import Any

from datasets import Dataset
from datasets.features import List, Value
from jinja2 import TemplateError

from distillation.base.errors import first_line
from distillation.data.data_files import DataError

ALPACA = "alpaca"
MESSAGES = "messages"
SHAREGPT = "conversations"
PROMPT_COMPLETION = "prompt/completion"
# Prompts without answers: a `prompt` column (texts, or lists of turns as TRL's prompt-only data), read when no
# format's columns are there (a `completion` column makes it prompt/completion data).
PROMPT_ONLY = "prompt"
# In order of precedence: the first whose columns a data set has (and its first row fills) is its format.
FORMAT_COLUMNS = {
    ALPACA: ("instruction", "output"),
    MESSAGES: ("messages",),
    SHAREGPT: ("conversations",),
    PROMPT_COMPLETION: ("prompt", "completion"),
}
ACCEPTED = (
    "Alpaca columns instruction/output (and input), a messages column of "
    '{"role": ..., "content": ...} turns, a ShareGPT conversations column of '
    '{"from": ..., "value": ...} turns, or prompt/completion columns (or a prompt column alone, for runs that '
    "generate every response)"
)
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    **{name: "assistant" for name in ("gpt", "assistant", "chatgpt", "bing", "bard", "model")},
}
GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


def check_columns(raw: Dataset, kind: str, dataset: str) -> None:
    """The columns of a chat format hold lists of turns (or, for prompt/completion, both texts or both lists)."""
    features = {name: raw.features[name] for name in FORMAT_COLUMNS[kind]}
    if kind == PROMPT_COMPLETION:
        if all(_is_text(feature) for feature in features.values()):
            return
        if all(isinstance(feature, List) for feature in features.values()):
            return
        raise DataError(
            f"the columns 'prompt' and 'completion' of {dataset} must both be texts or both be lists of "
            f'{{"role": ..., "content": ...}} messages; write each row\'s two the same way.'
        )
    ((name, feature),) = features.items()
    if not isinstance(feature, List):
        turn = '{"role": ..., "content": ...}' if kind == MESSAGES else '{"from": ..., "value": ...}'
        # Lists in most rows and something else in some (datasets' Json): the first such row is named.
        row = next((row for row, value in enumerate(raw[name]) if not isinstance(value, list | None)), None)
        where = f"the {name} of row {row + 1} of {dataset} is not a list of turns" if row is not None else ""
        raise DataError(
            (where or f"the column {name!r} of {dataset} does not hold lists of turns")
            + f"; write each row's {name} as a list of {turn} records."
        )


def to_messages(batch: dict, indices: list[int], kind: str, dataset: str) -> dict:
    """A batch of rows in format `kind` -> `messages`: lists of {"role", "content"} turns, each checked; the `row`
    each comes from; and whether it is `prompt_only` (to be continued by a model: a prompt-only data set's row, or
    a conversation with no assistant turn)."""
    if kind == MESSAGES:
        turns = [
            [_turn(turn, "role", "content", index, dataset) for turn in row or []]
            for row, index in zip(batch["messages"], indices)
        ]
    elif kind == SHAREGPT:
        turns = [
            [_sharegpt_turn(turn, index, dataset) for turn in row or []]
            for row, index in zip(batch["conversations"], indices)
        ]
    elif kind == PROMPT_ONLY:
        turns = [_prompt(prompt, index, dataset) for prompt, index in zip(batch["prompt"], indices)]
    else:
        turns = [
            _prompt_completion(prompt, completion, index, dataset)
            for prompt, completion, index in zip(batch["prompt"], batch["completion"], indices)
        ]
    prompt_only = [kind == PROMPT_ONLY or not _answered(conversation) for conversation in turns]
    for conversation, index in zip(turns, indices):
        _check_conversation(conversation, index, dataset)
    # `row`: counted from 1, for the refusals.
    return {"messages": turns, "row": [index + 1 for index in indices], "prompt_only": prompt_only}


def has_response(batch: dict) -> list[bool]:
    """Conversations whose assistant turns hold some text, and prompt-only ones with some text: the others are
    empty samples, dropped as Alpaca's are."""
    return [
        any(turn["content"].strip() for turn in row)
        if prompt_only
        else any(turn["role"] == "assistant" and turn["content"].strip() for turn in row)
        for row, prompt_only in zip(batch["messages"], batch["prompt_only"])
    ]


def _answered(conversation: list[dict]) -> bool:
    return any(turn["role"] == "assistant" for turn in conversation)


def _turn(turn: Any, role_key: str, content_key: str, index: int, dataset: str) -> dict:
    where = f"row {index + 1} of {dataset}"
    if (
        not isinstance(turn, dict)
        or not isinstance(turn.get(role_key), str)
        or not isinstance(turn.get(content_key), str)
    ):
        raise DataError(
            f"{where} has a turn without a text {role_key} and {content_key} ({turn!r}); write each "
            f'turn as {{"{role_key}": ..., "{content_key}": "..."}}.'
        )
    if role_key == "role" and turn["role"] not in ROLES:
        raise DataError(f"{where} has a turn of role {turn['role']!r}; use one of the roles {', '.join(ROLES)}.")
    return {"role": turn[role_key], "content": turn[content_key]}


def _sharegpt_turn(turn: Any, index: int, dataset: str) -> dict:
    checked = _turn(turn, "from", "value", index, dataset)
    if checked["role"] not in SHAREGPT_ROLES:
        raise DataError(
            f"row {index + 1} of {dataset} has a turn from {checked['role']!r}; use one of {', '.join(SHAREGPT_ROLES)}."
        )
    return {"role": SHAREGPT_ROLES[checked["role"]], "content": checked["content"]}


def _prompt_completion(prompt: Any, completion: Any, index: int, dataset: str) -> list[dict]:
    if isinstance(prompt, list) or isinstance(completion, list):
        return [_turn(turn, "role", "content", index, dataset) for turn in (prompt or []) + (completion or [])]
    # Texts, as Alpaca's fields: a missing one is empty.
    return [
        {"role": "user", "content": "" if prompt is None else str(prompt)},
        {"role": "assistant", "content": "" if completion is None else str(completion)},
    ]


def _prompt(prompt: Any, index: int, dataset: str) -> list[dict]:
    """A prompt-only row: a text (the user's turn) or a list of turns, which ends with the user's turn that the
    generated answer replies to."""
    if not isinstance(prompt, list):
        return [{"role": "user", "content": "" if prompt is None else str(prompt)}]
    turns = [_turn(turn, "role", "content", index, dataset) for turn in prompt]
    if turns and turns[-1]["role"] != "user":
        raise DataError(
            f"the prompt of row {index + 1} of {dataset} ends with a turn of the {turns[-1]['role']}, where the "
            f"generated answer needs the user's turn it replies to; end each prompt with a user turn."
        )
    return turns


def _check_conversation(conversation: list[dict], index: int, dataset: str) -> None:
    if not conversation:
        raise DataError(f"row {index + 1} of {dataset} is an empty conversation; give it turns, or remove it.")
    if not _answered(conversation) and conversation[-1]["role"] != "user":
        raise DataError(
            f"row {index + 1} of {dataset} has no assistant turn, so nothing to learn, and does not end with a "
            f"user turn, so it is no prompt either; add the answer, or remove the row."
        )


def rendering_template(tokenizer, template: Any) -> str:
    """The Jinja chat template that renders conversations: the tokenizer's own when it has one, else the prompt
    template's (`alpaca_chat_template`, so that chat data reads as the Alpaca samples the teacher saw)."""
    own = tokenizer_template(tokenizer)
    if own:
        return own
    return alpaca_chat_template(template)


def alpaca_chat_template(template: Any) -> str:
    """A Jinja chat template (the tokenizer's `chat_template`) that renders role/content messages in the format of
    `template` (a `templates.PromptTemplate`): each user turn as the prompt without input (the instruction), each
    assistant turn as its text then EOS, a system message before the first prompt. A single user/assistant exchange renders byte for byte as
    `alpaca_prompt(instruction, "") + response + EOS`, the training text of an Alpaca sample without input; the
    assistant turns are marked as generation (`return_assistant_tokens_mask`). The prompt ends where the response
    begins, so the generation prompt adds nothing."""
    prefix, suffix = template.without_input.split("{instruction}")
    prefix, suffix = (part.replace("{{", "{").replace("}}", "}") for part in (prefix, suffix))

    def literal(text: str) -> str:
        return json.dumps(text)  # a Jinja string literal with the same escapes

    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}{{ message['content'] }}{{ " + literal("\n\n") + " }}"
        "{%- elif message['role'] == 'user' -%}{{ "
        + literal(prefix)
        + " }}{{ message['content'] }}{{ "
        + literal(suffix)
        + " }}"
        "{%- elif message['role'] == 'assistant' -%}{% generation %}{{ message['content'] }}{{ eos_token }}"
        "{% endgeneration %}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )


def tokenizer_template(tokenizer) -> str | None:
    """The tokenizer's own chat template, if it has one."""
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the one apply_chat_template would use
        own = own.get("default")
    return own or None


def tokenize_conversations(rows: Dataset, tokenizer, chat_template: str, spec, num_proc, fingerprint: str) -> Dataset:
    """`messages` -> `input_ids` (the rendered conversation, cut at `spec.max_length`), `target_mask` (with
    `spec.mask_instruction`, True on the tokens of assistant turns: their text and the end of turn the template
    writes; else True everywhere), `prompt_length` and `length`.

    `prompt_length` counts the tokens that are not targets when the instruction is masked (position 0 always, as
    nothing predicts it): for an Alpaca sample that is its prompt, here every token outside the assistant turns.
    A prompt-only row is rendered with the template's generation prompt, so that a model continues it with the
    assistant's turn; it has no target (its prompt_length is its length), and is not cut: dataset.py drops one
    that does not fit. `fingerprint` names the output for `datasets`, which would otherwise hash the tokenizer to
    name it."""
    tagged = bool(GENERATION_TAG.search(chat_template))

    def encode_answered(batch: dict) -> tuple[list, list]:
        if not spec.mask_instruction:
            texts = [_render(tokenizer, messages, chat_template) for messages in batch["messages"]]
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
            masks = [[True] * len(sample) for sample in ids]
        elif tagged:
            encoded = tokenizer.apply_chat_template(
                batch["messages"], chat_template=chat_template, return_dict=True, return_assistant_tokens_mask=True
            )
            ids, masks = encoded["input_ids"], encoded["assistant_masks"]
        else:
            ids, masks = _tokenize_by_prefixes(tokenizer, batch, chat_template, spec.dataset)
        ids = [sample[: spec.max_length] for sample in ids]
        return ids, [[bool(marked) for marked in mask[: len(sample)]] for mask, sample in zip(masks, ids)]

    def encode_prompts(batch: dict) -> tuple[list, list]:
        texts = [
            _render(tokenizer, messages, chat_template, add_generation_prompt=True) for messages in batch["messages"]
        ]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return ids, [[False] * len(sample) for sample in ids]

    def encode(batch: dict) -> dict:
        try:
            ids, masks = _by_kind(batch, encode_answered, encode_prompts)
        except TemplateError as error:
            raise _unrenderable(tokenizer, batch, chat_template, spec.dataset, error) from None
        return {
            "input_ids": ids,
            "prompt_length": [1 + mask[1:].count(False) for mask in masks],
            "length": [len(sample) for sample in ids],
            "target_mask": masks,
        }

    return rows.map(
        encode,
        batched=True,
        remove_columns=rows.column_names,
        num_proc=num_proc,
        load_from_cache_file=False,
        new_fingerprint=fingerprint,
    )


def _by_kind(batch: dict, encode_answered, encode_prompts) -> tuple[list, list]:
    """(ids, masks) of a batch's rows, each encoded by the function of its kind (answered or prompt-only), in the
    batch's order; a batch of one kind is passed whole."""
    prompt_only = batch.get("prompt_only") or [False] * len(batch["messages"])
    if not any(prompt_only):
        return encode_answered(batch)
    if all(prompt_only):
        return encode_prompts(batch)
    ids, masks = [None] * len(prompt_only), [None] * len(prompt_only)
    for kind, encode in ((False, encode_answered), (True, encode_prompts)):
        rows = [index for index, flag in enumerate(prompt_only) if flag == kind]
        part = {key: [values[index] for index in rows] for key, values in batch.items()}
        for index, sample, mask in zip(rows, *encode(part), strict=True):
            ids[index], masks[index] = sample, mask
    return ids, masks


def _tokenize_by_prefixes(tokenizer, batch: dict, chat_template: str, dataset: str) -> tuple[list, list]:
    """Token ids and assistant masks for a template without generation tags: each assistant turn's characters lie
    between the conversation rendered up to it (with the generation prompt) and rendered through it; a token that
    overlaps them is a target, as `return_assistant_tokens_mask` decides."""
    texts, spans = [], []
    for messages, row in zip(batch["messages"], batch["row"]):
        text = _render(tokenizer, messages, chat_template)
        turns = []
        for position, turn in enumerate(messages):
            if turn["role"] != "assistant":
                continue
            before = _render(tokenizer, messages[:position], chat_template, True) if position else ""
            through = _render(tokenizer, messages[: position + 1], chat_template)
            if not (text.startswith(through) and through.startswith(before)):
                raise DataError(
                    f"the tokenizer's chat template renders the first turns of row {row} of {dataset} "
                    f"differently when more follow, so its assistant turns cannot be found; add "
                    f"{{% generation %}} tags around its assistant turns, or set data.mask_instruction "
                    f"to false."
                )
            turns.append((len(before), len(through)))
        texts.append(text)
        spans.append(turns)
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    masks = [
        [any(end > low and start < high for low, high in turns) for start, end in offsets]
        for offsets, turns in zip(encoded["offset_mapping"], spans)
    ]
    return encoded["input_ids"], masks


def _unrenderable(tokenizer, batch: dict, chat_template: str, dataset: str, error: TemplateError) -> DataError:
    """The template's refusal (a `raise_exception`, say roles that do not alternate), naming the first row it
    refuses on its own."""
    row = None
    for messages, number in zip(batch["messages"], batch["row"]):
        try:
            _render(tokenizer, messages, chat_template)
        except TemplateError as own_error:
            row, error = number, own_error
            break
    where = f"row {row} of {dataset}" if row is not None else f"a conversation of {dataset}"
    return DataError(
        f"the chat template cannot render {where} ({first_line(error)}); fix the conversation, or "
        f"the tokenizer's chat_template."
    )


def _render(tokenizer, messages: list, chat_template: str, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _is_text(feature) -> bool:
    return isinstance(feature, Value) and feature.dtype in ("string", "large_string")
