"""Sharing the student: best/ prompts as the student was trained and stops at EOS, carries a model card whose figures
are summary.json's, and is pushed to the Hub (a stand-in HfApi here; the refusals and the network's faults through
the real client, against a real local server, are in test_hub_network.py)."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest

import dataset
import distill
from distillation.data import chat_data
from distillation.run.checkpoints import set_generation_defaults
from distillation.settings.config import ConfigError, load_config
from helpers import REPO, SHORT, base_config, write_config

MODEL_ID = "someone/tiny-student"
INSTRUCTION = "List two colours."


class StandInHub:
    """Records what huggingface_hub.HfApi would send: the repositories created and each uploaded folder's files,
    after the ignore patterns, as the real upload_folder filters them."""

    def __init__(self) -> None:
        self.created, self.uploads = [], []

    def install(self, patch: pytest.MonkeyPatch) -> None:
        import huggingface_hub

        hub = self

        def create_repo(_api, repo_id, *, repo_type=None, exist_ok=False, **_):
            hub.created.append((repo_id, repo_type, exist_ok))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(_api, *, repo_id, folder_path, ignore_patterns=None, **_):
            from huggingface_hub.utils import filter_repo_objects

            names = sorted(path.name for path in Path(folder_path).iterdir())
            hub.uploads.append(
                (repo_id, Path(folder_path), sorted(filter_repo_objects(names, ignore_patterns=ignore_patterns)))
            )

        patch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        patch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the tests run offline otherwise
        patch.setenv("HF_TOKEN", "hf_stand_in")


@pytest.fixture(scope="module")
def shared_runs(tmp_path_factory, teacher_dir, data_file):
    """A distilled run with hub.model_id set, then its plain baseline, against the stand-in Hub."""
    root = tmp_path_factory.mktemp("shared")
    values = base_config(root, teacher_dir, data_file)
    values["training_parameters"]["max_steps"] = 6
    values["hub"] = {"model_id": MODEL_ID}
    config_file = write_config(root / "config.yaml", values)
    hub = StandInHub()
    with pytest.MonkeyPatch.context() as patch:
        hub.install(patch)
        assert distill.main(["--config", str(config_file), "--run-name", "shared", "--plain-baseline"]) == 0
    return root / "checkpoints" / "shared", root / "checkpoints" / "shared-plain", hub


def test_the_saved_chat_template_is_the_one_that_rendered_the_training_text(tokenizer):
    """Alpaca samples: the prompt template's, even over a tokenizer's own chat template (the student never saw that
    one); chat data: the one that rendered it; a text_column run: none. Setting it changes no tokenization."""
    from datasets import Dataset, DatasetDict
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=len(tokenizer)))
    spec = dataset.DataSpec("data.jsonl", None, 64, (0.6, 0.2, 0.2), False, None, 0, SHORT)
    alpaca_rows = DatasetDict(train=Dataset.from_dict({"input_ids": [[1]], "prompt_length": [0]}))
    chat_rows = DatasetDict(train=Dataset.from_dict({"input_ids": [[1]], "prompt_length": [0], "target_mask": [[1]]}))
    own_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    own = copy.deepcopy(tokenizer)
    own.chat_template = own_template
    assert dataset.training_chat_template(spec, tokenizer, alpaca_rows) == chat_data.alpaca_chat_template(SHORT)
    assert dataset.training_chat_template(spec, own, alpaca_rows) == chat_data.alpaca_chat_template(SHORT)
    assert dataset.training_chat_template(spec, tokenizer, chat_rows) == chat_data.alpaca_chat_template(SHORT)
    assert dataset.training_chat_template(spec, own, chat_rows) == own_template
    text_spec = dataclasses.replace(spec, text_column="text")
    assert dataset.training_chat_template(text_spec, tokenizer, alpaca_rows) is None

    text = dataset.alpaca_prompt(INSTRUCTION, "", SHORT) + "red and blue"
    fresh = copy.deepcopy(tokenizer)
    set_generation_defaults(fresh, model, chat_data.alpaca_chat_template(SHORT), max_length=64)
    assert fresh.chat_template == chat_data.alpaca_chat_template(SHORT)
    assert fresh(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == (
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert model.generation_config.do_sample is False and model.generation_config.max_new_tokens == 32
    whole_texts = copy.deepcopy(tokenizer)
    set_generation_defaults(whole_texts, model, None, max_length=64)  # a text_column run: no known prompt format
    assert whole_texts.chat_template is None


def test_best_checkpoint_prompts_as_trained_through_a_pipeline(shared_runs):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    best = shared_runs[0] / "best"
    tokenizer = AutoTokenizer.from_pretrained(best)
    messages = [{"role": "user", "content": INSTRUCTION}]
    prompt = dataset.alpaca_prompt(INSTRUCTION, "", SHORT)
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == prompt
    generation = json.loads((best / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id and generation["pad_token_id"] == tokenizer.pad_token_id
    assert generation["do_sample"] is False

    generator = pipeline("text-generation", model=str(best), tokenizer=str(best))
    reply = generator(messages, max_new_tokens=6)[0]["generated_text"][-1]
    assert reply["role"] == "assistant"
    # Greedy: the pipeline's reply is the model's own continuation of exactly the training prompt.
    model = AutoModelForCausalLM.from_pretrained(best)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        continued = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6)
    assert reply["content"] == tokenizer.decode(continued[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("run_index", [0, 1], ids=["distilled", "plain"])
def test_model_card_parses_and_holds_the_summary_figures(shared_runs, run_index):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM

    run = shared_runs[run_index]
    summary = json.loads((run / "summary.json").read_text())
    card = ModelCard.load(run / "best" / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    figures = {result.metric_name: result.metric_value for result in card.data.eval_results}
    expected = {"Test perplexity": summary["test"]["perplexity"]}
    if run_index == 0:
        expected.update(
            {
                "Teacher test perplexity": summary["teacher"]["test"]["perplexity"],
                "KL(teacher || student) at T=1": summary["test"]["kl_teacher"],
                "Top-1 agreement with the teacher": summary["test"]["top1_agreement"],
            }
        )
    assert figures == expected
    assert ("knowledge-distillation" if run_index == 0 else "distillation-baseline") in card.data.tags
    assert (run / "best" / "loss_curves.png").read_bytes() == (run / "loss_curves.png").read_bytes()
    assert "](loss_curves.png)" in card.text and f"--config {run / 'config.yaml'}" in card.text
    parameters = AutoModelForCausalLM.from_pretrained(run / "best").num_parameters()
    assert f"| 1 | 32 | {summary_vocabulary(run)} | {parameters:,} |" in card.text
    assert ("`ClassicLoss`" if run_index else "`DistillationLoss`: alpha=1.0, beta=0.5, temperature=2.0") in card.text


def summary_vocabulary(run: Path) -> int:
    return json.loads((run / "best" / "config.json").read_text())["vocab_size"]


def test_end_of_run_push_uploads_best_without_the_resume_state(shared_runs):
    distilled, _, hub = shared_runs
    assert hub.created == [(MODEL_ID, "model", True)]  # the plain baseline is not pushed over the student
    ((repo_id, folder, files),) = hub.uploads
    assert repo_id == MODEL_ID and folder == distilled / "best"
    assert {
        "README.md",
        "loss_curves.png",
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "chat_template.jinja",
    } <= set(files)
    assert not {"training_state.pt", "trainer_state.json"} & set(files)


def test_push_command_pushes_a_finished_run_later(shared_runs, monkeypatch):
    _, plain, _ = shared_runs
    hub = StandInHub()
    hub.install(monkeypatch)
    assert distill.main(["--push", str(plain), "--model-id", "someone/plain"]) == 0
    assert hub.created == [("someone/plain", "model", True)] and hub.uploads[0][:2] == ("someone/plain", plain / "best")
    # The baseline's own config names no repository: --model-id is needed.
    assert distill.main(["--push", str(plain)]) == distill.EXIT_USER_ERROR
    assert distill.main(["--push", str(plain), "--model-id", "a/b/c"]) == distill.EXIT_USER_ERROR
    assert len(hub.uploads) == 1


@pytest.mark.parametrize(
    "hub, fragment",
    [
        ({"model_id": "a/b/c"}, "hub.model_id"),
        ({"model_id": 3}, "hub.model_id"),
        ({"model": "a/b"}, "unknown key hub.model"),
    ],
)
def test_bad_hub_section_is_refused(tmp_path, config_values, hub, fragment):
    config_values["hub"] = hub
    with pytest.raises(ConfigError, match=fragment):
        load_config(write_config(tmp_path / "config.yaml", config_values))


def test_hub_section_defaults_to_no_push(config_file):
    assert load_config(config_file).hub.model_id is None
    assert load_config(REPO / "config.yaml").hub.model_id is None


def test_push_of_a_run_with_a_damaged_summary_is_one_sentence_and_exit_2(shared_runs, tmp_path, monkeypatch, caplog):
    """A real truncated summary.json and no model card: writing the card fails to read it, and --push says which run
    cannot be pushed and what to check, without a traceback and without uploading anything."""
    import shutil

    _, plain, _ = shared_runs
    run = shutil.copytree(plain, tmp_path / plain.name)
    (run / "best" / "README.md").unlink()
    summary = run / "summary.json"
    summary.write_bytes(summary.read_bytes()[: len(summary.read_bytes()) // 2])
    hub = StandInHub()
    hub.install(monkeypatch)
    assert distill.main(["--push", str(run), "--model-id", "someone/plain"]) == distill.EXIT_USER_ERROR
    errors = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 1 and f"the run {run} cannot be pushed" in errors[0] and "summary.json" in errors[0]
    assert "\n" not in errors[0] and hub.uploads == []
