"""The model card of a run's best checkpoint: `best/README.md`, built from the run's config and summary.json, with
the run's loss curves copied beside it, so that the checkpoint (and its copy on the Hub) says what the student is,
how it was trained, how well it does against its teacher and how to train it again.

Written at the end of every run, distilled or plain, once summary.json is final; `distill.py --push` writes it for a
run that has none. The card's metadata (model-index) holds the test figures exactly as summary.json has them.
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import safetensors

from distillation.base import storage
from distillation.run.checkpoints import WEIGHTS_FILE
from distillation.settings.config import to_plain_dict
from distillation.settings.schema import Config, is_hub_repo_id

CARD_FILE = "README.md"
SUMMARY_FILE = "summary.json"
CURVES_FILE = "loss_curves.png"  # what plots.write_run_curves draws in the run directory
# The figures of summary.json that the card shows: counts (whole numbers), and other figures (a number or null).
SUMMARY_COUNTS = ("steps", "samples_seen", "tokens_seen", "best_step")
SUMMARY_FIGURES = ("run", "best_validation_loss")
# The generation figures of summary.json's test, where the run scored answers (generation_prompts > 0): their rows.
GENERATION_ROWS = {
    "rouge_l": "ROUGE-L F1 of the answers",
    "teacher_nll": "teacher NLL per answer token",
    "response_length": "answer length (new tokens)",
    "eos_share": "share of answers ending in EOS",
}


def write_model_card(run_directory: Path, config: Config) -> Path:
    """Write `<best checkpoint>/README.md` (and copy the run's loss curves there), replacing an earlier card."""
    best = run_directory / config.training_parameters.checkpoints_name_best
    summary = json.loads((run_directory / SUMMARY_FILE).read_text())
    check_summary(summary)
    figure = _copy_figure(run_directory, best)
    card = build_card(config, summary, student_shape(best), figure, run_directory)
    storage.atomic_write_text(best / CARD_FILE, str(card))
    return best / CARD_FILE


def check_summary(summary) -> None:
    """Refuse a summary.json that lacks a figure the card shows (an object written by hand, `{}`), naming every one
    with a ValueError: the card would otherwise stop at the first, with a KeyError or a TypeError."""
    if not isinstance(summary, dict):
        raise ValueError(f"{SUMMARY_FILE} holds a JSON {type(summary).__name__}, not an object of the run's figures")
    test = summary.get("test") if isinstance(summary.get("test"), dict) else {}
    teacher = summary.get("teacher") or {}
    missing = [field for field in SUMMARY_FIGURES if field not in summary]
    missing += [field for field in SUMMARY_COUNTS if not _is_count(summary.get(field))]
    missing += [] if "perplexity" in test else ["test.perplexity"]
    missing += [] if _is_count(test.get("target_tokens")) else ["test.target_tokens"]
    if test.get("kl_teacher") is not None and "top1_agreement" not in test:
        missing.append("test.top1_agreement")
    teacher_test = teacher.get("test", {"perplexity": None}) if isinstance(teacher, dict) else None
    if not isinstance(teacher_test, dict) or "perplexity" not in teacher_test:
        missing.append("teacher.test.perplexity")
    if missing:
        raise ValueError(f"{SUMMARY_FILE} lacks {', '.join(missing)}")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _copy_figure(run_directory: Path, best: Path) -> str | None:
    curves = run_directory / CURVES_FILE
    if not curves.is_file():  # matplotlib is not installed: the card goes without its figure
        return None
    storage.atomic_write_bytes(best / CURVES_FILE, curves.read_bytes())
    return CURVES_FILE


def student_shape(checkpoint: Path) -> dict:
    """Layers, width, vocabulary and parameter count of a saved model (a tied output head counted once, as saved)."""
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(checkpoint)
    with safetensors.safe_open(str(checkpoint / WEIGHTS_FILE), framework="pt") as weights:
        parameters = sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    return {
        "model_type": model_config.model_type,
        "layers": model_config.num_hidden_layers,
        "width": model_config.hidden_size,
        "vocabulary": model_config.vocab_size,
        "parameters": parameters,
    }


def hub_id(name: str | None) -> str | None:
    """`name` if it names a Hub repository rather than a local path, else None."""
    if name is None or Path(name).exists() or not is_hub_repo_id(name):
        return None
    return name


def build_card(config: Config, summary: dict, shape: dict, figure: str | None, run_directory: Path):
    from huggingface_hub import ModelCard

    distilled = config.training_parameters.loss.requires_teacher
    body = "\n\n".join(
        [
            f"# {summary['run']}",
            _introduction(config, shape, distilled),
            _usage_section(config),
            _student_section(config, shape),
            _data_section(config, summary),
            _loss_section(config),
            _results_section(summary),
            f"## Loss curves\n\n![loss curves of the run]({figure})" if figure else "",
            _reproduce_section(config, run_directory),
        ]
    )
    metadata = card_data(config, summary, shape, distilled).to_yaml()
    return ModelCard(f"---\n{metadata}\n---\n\n{body}\n")


def card_data(config: Config, summary: dict, shape: dict, distilled: bool):
    """The card's metadata: library, base model and data set where they are Hub ids, tags, and the test figures."""
    from huggingface_hub import ModelCardData

    teacher_used = distilled or config.student.init != "random"
    base_model = hub_id(config.student.pretrained) or (hub_id(config.teacher.name) if teacher_used else None)
    data_id = hub_id(config.data.dataset)
    tags = ["knowledge-distillation" if distilled else "distillation-baseline", shape["model_type"]]
    return ModelCardData(
        model_name=summary["run"],
        library_name="transformers",
        pipeline_tag="text-generation",
        base_model=base_model,
        datasets=[data_id] if data_id else None,
        tags=tags,
        eval_results=_eval_results(config, summary),
    )


def _eval_results(config: Config, summary: dict) -> list:
    from huggingface_hub import EvalResult

    test, teacher = summary["test"], summary.get("teacher") or {}
    figures = [("perplexity", "Test perplexity", test["perplexity"])]
    if "test" in teacher:
        figures.append(("perplexity", "Teacher test perplexity", teacher["test"]["perplexity"]))
    if test.get("kl_teacher") is not None:
        figures.append(("kl_divergence", "KL(teacher || student) at T=1", test["kl_teacher"]))
        figures.append(("accuracy", "Top-1 agreement with the teacher", test["top1_agreement"]))
    if _figure(test, "rouge_l") is not None:
        figures.append(("rouge", "Test ROUGE-L F1 of greedy answers", test["rouge_l"]))
    dataset = config.data.dataset
    return [
        EvalResult(
            task_type="text-generation",
            dataset_type=hub_id(dataset) or Path(dataset).name,
            dataset_name=dataset,
            dataset_split="test",
            metric_type=kind,
            metric_name=name,
            metric_value=value,
        )
        for kind, name, value in figures
    ]


def _introduction(config: Config, shape: dict, distilled: bool) -> str:
    how = (
        f"distilled from the teacher `{config.teacher.name}` with `{_loss_name(config)}`"
        if distilled
        else f"trained without a teacher (plain next-token training, `{_loss_name(config)}`): the baseline of "
        f"the distilled students of this config"
    )
    return (
        f"A {shape['layers']}-layer, {shape['parameters']:,}-parameter {shape['model_type']} student {how}, on "
        f"`{config.data.dataset}`. Trained with this project's `distill.py`; the best checkpoint by validation "
        f"{config.training_parameters.best_metric}."
    )


def _usage_section(config: Config) -> str:
    template = config.data.template
    prompt = (
        "The tokenizer's chat template writes a user message in the prompt format the student was trained on "
        f"(`data.template: {template if isinstance(template, str) else 'custom'}`); generation is greedy and "
        "stops at EOS (`generation_config.json`)."
        if config.data.text_column is None
        else f"The student was trained on the `{config.data.text_column}` column as whole texts: prompt it as those "
        f"texts begin."
    )
    return (
        "## Use\n\n```python\nfrom transformers import pipeline\n\n"
        'generator = pipeline("text-generation", model="PATH_OR_HUB_ID")\n'
        'print(generator([{"role": "user", "content": "Give three tips for staying healthy."}]))\n```\n\n' + prompt
    )


def _student_section(config: Config, shape: dict) -> str:
    student = config.student
    if student.pretrained is not None:
        start = f"the pretrained `{student.pretrained}`"
    elif student.init == "random":
        start = "random (the teacher's config with fewer layers: the untrained truncated teacher)"
    elif student.init == "uniform":
        start = "the teacher's embeddings, final norm and head, and teacher blocks evenly spaced"
    else:
        start = f"the teacher's embeddings, final norm and head, and its blocks {student.teacher_layers}"
    return (
        "## Student\n\n| layers | width | vocabulary | parameters | initialisation |\n|---|---|---|---|---|\n"
        f"| {shape['layers']} | {shape['width']} | {shape['vocabulary']} | {shape['parameters']:,} | {start} |"
    )


def _data_section(config: Config, summary: dict) -> str:
    data, split = config.data, config.data.split
    template = data.template if isinstance(data.template, str) else "custom"
    if summary.get("data_format") == "chat":  # a summary written before the field is an Alpaca or text run's
        text = (
            "conversations (role/content turns), each rendered by the chat template saved with this tokenizer (a "
            f"teacher's own, else user turns in the `{template}` prompt format and each assistant turn as its "
            "response then EOS)"
        )
        scored = "; only the assistant turns scored"
    else:
        text = (
            f"the `{data.text_column}` column"
            if data.text_column is not None
            else f"the Alpaca fields in the `{template}` prompt"
        )
        text += ", then EOS"
        scored = "; only the responses scored"
    limit = f", the first {data.max_samples} rows" if data.max_samples is not None else ""
    return (
        f"## Data\n\n`{data.dataset}`{limit}: {text}, cut at {data.max_length} tokens; split "
        f"{split.train:g}/{split.validation:g}/{split.test:g} (train/validation/test) with seed {config.seed}"
        f"{scored if data.mask_instruction else ''}. Trained for {summary['steps']} steps "
        f"({summary['samples_seen']:,} samples, {summary['tokens_seen']:,} tokens)."
    )


def _loss_name(config: Config) -> str:
    return type(config.training_parameters.loss).__name__


def _loss_section(config: Config) -> str:
    settings = config.training_parameters.loss.spec()
    written = ", ".join(f"{key}={value}" for key, value in settings.items() if key != "()") or "no settings"
    return f"## Loss\n\n`{_loss_name(config)}`: {written}."


def _results_section(summary: dict) -> str:
    test, teacher = summary["test"], (summary.get("teacher") or {}).get("test")
    rows = [("perplexity", _number(test["perplexity"]), _number(teacher["perplexity"]) if teacher else "-")]
    if test.get("kl_teacher") is not None:
        rows.append(("KL(teacher ‖ student) per token, T = 1", _number(test["kl_teacher"]), "-"))
        rows.append(("top-1 agreement with the teacher", _number(test["top1_agreement"]), "-"))
    answered = _figure(test, "generation_prompts")
    # Runs made before the generation figures, or with generation_prompts 0, have none: no rows.
    scored = bool(answered) or any(_figure(test, key) is not None for key in GENERATION_ROWS)
    if scored:
        rows += [(name, _number(_figure(test, key)), "-") for key, name in GENERATION_ROWS.items()]
    table = "\n".join(f"| {name} | {student} | {reference} |" for name, student, reference in rows)
    section = (
        f"## Results\n\nOn the test split ({test['target_tokens']:,} target tokens), the best checkpoint (step "
        f"{summary['best_step']}, validation loss {_number(summary['best_validation_loss'])}):\n\n"
        f"| | student | teacher |\n|---|---|---|\n{table}"
    )
    if scored:
        prompts = f"{answered:g} " if answered else ""
        section += (
            f"\n\nThe answer figures are the student's greedy answers to the first {prompts}test prompts: ROUGE-L "
            "F1 against the reference response (the `rouge-score` package), the teacher's negative log-likelihood "
            "per token of the answers (EOS included; lower: answers the teacher finds likelier; `-` without a "
            "teacher), the mean answer length in new tokens and the share of answers that end in EOS."
        )
    return section


def _figure(test: dict, key: str) -> float | None:
    """A generation figure of the test split: a number, or None where the run has none (null, absent, damaged)."""
    value = test.get(key)
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _reproduce_section(config: Config, run_directory: Path) -> str:
    import yaml

    config_file = run_directory / "config.yaml"
    again = f"{run_directory.name}-again"
    text = config_file.read_text() if config_file.is_file() else yaml.safe_dump(to_plain_dict(config), sort_keys=False)
    return (
        f"## Reproduce\n\nThe run's resolved config is kept as `{config_file}`; from this project's root:\n\n"
        f"```\n{shlex.join(['python3', 'distill.py', '--config', str(config_file), '--run-name', again])}\n```\n\n"
        f"<details><summary>config.yaml</summary>\n\n```yaml\n{text.rstrip()}\n```\n\n</details>"
    )
