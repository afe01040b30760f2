"""The prompt templates of instruction samples: the ones `data.template` can name, and the check of a template the
config writes out. Plain text, so that the config is checked without loading the data layer."""

from __future__ import annotations

import string
from typing import Any, NamedTuple


class PromptTemplate(NamedTuple):
    """The prompt of an instruction sample, as two `str.format` templates: `with_input` (fields `{instruction}` and
    `{input}`) for a sample whose input is not empty, `without_input` (`{instruction}` only) otherwise. The response
    follows the prompt directly, then EOS."""

    with_input: str
    without_input: str


PROMPT_TEMPLATES = {
    # Stanford Alpaca's prompt, byte for byte the `text` column of vicgalle/alpaca-gpt4 (prompt, then the output),
    # on which the original project's teacher vicgalle/gpt2-alpaca-gpt4 was fine-tuned.
    "alpaca": PromptTemplate(
        with_input=(
            "Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        ),
        without_input=(
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Response:\n"
        ),
    ),
    # The same sections without the preamble: shorter samples (the embedded demo's teacher was trained on these).
    "alpaca_short": PromptTemplate(
        with_input="### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        without_input="### Instruction:\n{instruction}\n\n### Response:\n",
    ),
}
DEFAULT_TEMPLATE = PROMPT_TEMPLATES["alpaca"]


def prompt_template(value: Any) -> PromptTemplate:
    """`data.template` as a PromptTemplate: the name of one of PROMPT_TEMPLATES, or a mapping with the two
    templates `with_input` and `without_input`. Anything else raises ValueError, whose message names the fix."""
    if isinstance(value, str):
        if value not in PROMPT_TEMPLATES:
            raise ValueError(
                f"data.template is {value!r}; use one of {', '.join(PROMPT_TEMPLATES)}, or a section with "
                f"with_input and without_input templates."
            )
        return PROMPT_TEMPLATES[value]
    if not isinstance(value, dict) or set(value) != set(PromptTemplate._fields):
        raise ValueError(
            f"data.template is {value!r}; use one of {', '.join(PROMPT_TEMPLATES)}, or a section with exactly the "
            f"keys with_input (fields {{instruction}} and {{input}}) and without_input (field {{instruction}})."
        )
    for key, fields in (("with_input", {"instruction", "input"}), ("without_input", {"instruction"})):
        text = value[key]
        try:
            found = (
                {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
                if isinstance(text, str)
                else None
            )
        except ValueError:
            found = None
        if found != fields:
            raise ValueError(
                f"data.template.{key} is {text!r}; it must be a text whose fields are exactly "
                f"{' and '.join('{' + name + '}' for name in sorted(fields))} (write a literal brace as {{{{ or }}}})."
            )
    return PromptTemplate(value["with_input"], value["without_input"])
