"""The generation figures (training/generation_figures.py): the scoring of answers against hand-built ones and an
independent formula, and a short run that writes them and selects best/ by ROUGE-L."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import dataset
import distill
from distillation.data import batching
from distillation.run.checkpoints import TrainerState, load_trainer_state
from distillation.training import generation_figures
from helpers import SHORT, base_config, read_metrics, trainer_state, write_config
from loss import ModelOutput

FIGURES = set(generation_figures.FIGURE_NAMES)


def tokenized_samples(rows, tokenizer, count: int) -> list[dict]:
    """Alpaca samples as dataset.py tokenizes them: prompt, response, EOS; `prompt_length` the prompt's tokens."""
    samples = []
    for row in rows[:count]:
        prompt = tokenizer(dataset.alpaca_prompt(row["instruction"], row["input"], SHORT))["input_ids"]
        response = tokenizer(row["output"])["input_ids"]
        samples.append({"input_ids": prompt + response + [tokenizer.eos_token_id], "prompt_length": len(prompt)})
    return samples


def rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])


def test_a_student_answering_the_references_scores_rouge_l_one(rows, tokenizer):
    eos = tokenizer.eos_token_id
    cuts = [generation_figures.prompt_and_reference(sample, eos) for sample in tokenized_samples(rows, tokenizer, 6)]
    for sample, cut in zip(tokenized_samples(rows, tokenizer, 6), cuts, strict=True):
        assert cut.prompt + cut.reference + [eos] == sample["input_ids"] and len(cut.prompt) == sample["prompt_length"]
    references = [cut.reference for cut in cuts]
    answers = [reference + [eos] for reference in references]  # what a student that answers the reference writes
    rouge, length, ends, count = generation_figures.answer_sums(answers, references, [1] * 6, tokenizer, rouge_scorer())
    assert rouge / count == pytest.approx(1.0)
    assert (length, ends, count) == (sum(map(len, answers)), 6, 6)


def test_length_and_eos_share_of_hand_built_answers(tokenizer):
    eos, scorer = tokenizer.eos_token_id, rouge_scorer()
    words = tokenizer("the cat sat on the mat")["input_ids"]
    answers = [words + [eos], words[:2], [eos], words[:3]]
    rouge, length, ends, count = generation_figures.answer_sums(answers, [words] * 4, [1, 1, 1, 0], tokenizer, scorer)
    assert (length, ends, count) == (len(words) + 1 + 2 + 1, 2, 3)  # the weight-0 answer counts for nothing
    assert rouge == pytest.approx(
        1.0 + scorer.score("the cat sat on the mat", tokenizer.decode(words[:2]))["rougeL"].fmeasure
    )


def test_a_plain_text_is_cut_in_the_middle():
    cut = generation_figures.prompt_and_reference({"input_ids": [5, 6, 7, 8, 9, 0], "prompt_length": 0}, 0)
    assert (cut.prompt, cut.reference) == ([5, 6, 7], [8, 9])


def test_teacher_nll_is_the_teachers_log_likelihood_of_the_answer_tokens(teacher_dir, tokenizer):
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    prompts = [[11, 12, 13, 14, 15], [21, 22], [31, 32, 33]]
    answers = [[40, 41, tokenizer.eos_token_id], [50, 51, 52, 53, 54, 55], [60]]
    weights, vocab_size = [1, 1, 0], teacher.config.vocab_size - 8  # scored over the student's smaller vocabulary
    collate = batching.PaddingCollator(tokenizer.pad_token_id, mask_instruction=True)
    sums = generation_figures.teacher_nll_sums(
        lambda batch: ModelOutput(teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits),
        prompts,
        answers,
        weights,
        collate,
        vocab_size,
        Accelerator(cpu=True),
    )
    expected_sum, expected_tokens = 0.0, 0
    with torch.no_grad():
        for prompt, answer in zip(prompts[:2], answers[:2], strict=True):
            ids = torch.tensor([prompt + answer])
            log_probs = F.log_softmax(teacher(ids).logits[0, :, :vocab_size], dim=-1)
            positions = torch.arange(len(prompt) - 1, len(prompt) + len(answer) - 1)
            expected_sum -= log_probs[positions, torch.tensor(answer)].sum().item()
            expected_tokens += len(answer)
    assert sums[1].item() == expected_tokens
    assert sums[0].item() == pytest.approx(expected_sum, rel=1e-5)


def test_best_metric_rouge_l_keeps_the_highest_rouge_l_whatever_the_loss():
    state = TrainerState()
    chosen = []
    for step, (loss, rouge_l) in enumerate([(3.0, 0.2), (2.0, 0.1), (4.0, 0.3), (1.0, 0.3)], start=1):
        state.global_step = step
        if state.record_validation({"loss": loss, "perplexity": 2 * loss, "rouge_l": rouge_l}, "rouge_l"):
            chosen.append(step)
    assert chosen == [1, 3] and state.best_step == 3
    assert (state.best_validation_rouge_l, state.best_validation_loss) == (0.3, 4.0)


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, teacher_dir, data_file):
    """Four steps validated every two, the student's greedy answers to 4 prompts scored, best/ by ROUGE-L."""
    root = tmp_path_factory.mktemp("generation-figures")
    values = base_config(root, teacher_dir, data_file)
    values["training_parameters"].update(
        max_steps=4, eval_every_steps=2, generation_prompts=4, best_metric="rouge_l", sample_prompts=0, report_to="none"
    )
    values["responses"] = {"max_new_tokens": 6}
    config_file = write_config(root / "config.yaml", values)
    assert distill.main(["--config", str(config_file), "--run-name", "scored"]) == 0
    return root / "checkpoints" / "scored"


def test_validation_and_test_records_and_the_summary_hold_the_generation_figures(scored_run):
    records = [record for record in read_metrics(scored_run) if record["split"] != "train"]
    assert [(record["split"], record["step"]) for record in records] == [
        ("validation", 2),
        ("validation", 4),
        ("test", 4),
    ]
    summary = json.loads((scored_run / "summary.json").read_text())
    for figures in [*records, summary["test"]]:
        assert figures["generation_prompts"] == 4
        assert 0.0 <= figures["rouge_l"] <= 1.0 and 0.0 <= figures["eos_share"] <= 1.0
        assert 1.0 <= figures["response_length"] <= 6.0
        assert figures["teacher_nll"] > 0
    assert {key: summary["test"][key] for key in FIGURES} == {key: records[-1][key] for key in FIGURES}
    assert "ROUGE-L" in (scored_run / "train.log").read_text().split("Validation at step 2:")[1].splitlines()[0]


def test_best_metric_rouge_l_picks_best_by_it_and_a_resume_keeps_it(scored_run):
    validations = [record for record in read_metrics(scored_run) if record["split"] == "validation"]
    best = max(validations, key=lambda record: record["rouge_l"])  # the first of equals: a later one must beat it
    state = trainer_state(scored_run / "best")
    assert state["global_step"] == best["step"] and state["best_validation_rouge_l"] == best["rouge_l"]
    summary = json.loads((scored_run / "summary.json").read_text())
    assert summary["best_step"] == best["step"]
    saved = trainer_state(scored_run / "last")
    assert saved["best_validation_rouge_l"] == best["rouge_l"]
    restored = load_trainer_state(scored_run / "last", saved["identity"])
    assert (restored.best_validation_rouge_l, restored.best_step) == (best["rouge_l"], best["step"])
