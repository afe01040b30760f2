"""On-policy and sequence-level distillation: generation (batched, cached, seeded), the loss on generated responses
(normalised per generated token, zero when the student is its teacher), the steps' sources, a run at lmbda 0 equal
to a run without generation, and a killed on-policy run resumed to the weights and records of a straight one."""

from __future__ import annotations

import json
import signal
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from test_recovery import run_process

import distill
import loss
from distillation.data import batching
from distillation.settings.config import load_config
from distillation.training import generation, responses
from distillation.training.samples import greedy_continuation
from helpers import read_metrics, save_gpt2, weights, write_config

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tv")


def trainer_for(config_file, run_name: str, *overrides: str):
    """A trainer as `python3 distill.py` sets it up, with nothing written to its run directory yet."""
    return distill.setup(load_config(config_file, list(overrides)), run_name, False)


@pytest.fixture(scope="module")
def model(teacher_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(teacher_dir).eval()


def prompts_of(tokenizer, texts: list[str]) -> list[list[int]]:
    return [tokenizer(text)["input_ids"] for text in texts]


PROMPTS = ["### Instruction:\nName a colour.\n\n### Response:\n", "### Instruction:\nAdd 2 and 3.", "Hello"]


def test_batched_cached_greedy_generation_is_each_prompts_own_greedy_continuation(model, tokenizer):
    """Left padding, position ids and the key-value cache change nothing: each row equals the prompt continued
    alone, one full forward pass per token without a cache (samples.greedy_continuation)."""
    accelerator = Accelerator(cpu=True)
    prompts = prompts_of(tokenizer, PROMPTS)
    assert len({len(prompt) for prompt in prompts}) == 3  # the batch needs padding
    settings = generation.Sampling(max_new_tokens=12, greedy=True)
    batched = generation.generate(model, prompts, settings, tokenizer.eos_token_id, tokenizer.pad_token_id, accelerator)
    for prompt, answer in zip(prompts, batched, strict=True):
        alone = greedy_continuation(model, prompt, tokenizer.eos_token_id, accelerator, max_new_tokens=12)
        assert answer[: len(alone)] == alone
        ended = answer[-1] == tokenizer.eos_token_id
        assert len(answer) == (len(alone) + 1 if ended else 12)  # up to and including its EOS


def test_sampling_is_a_function_of_its_generator_and_settings(model, tokenizer):
    accelerator = Accelerator(cpu=True)
    prompts = prompts_of(tokenizer, PROMPTS)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    def sample(seed: int, **settings):
        generator = torch.Generator().manual_seed(seed)
        return generation.generate(
            model, prompts, generation.Sampling(10, **settings), eos, pad, accelerator, generator
        )

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)  # pure sampling from a random model's flat distribution
    greedy = generation.generate(model, prompts, generation.Sampling(10, greedy=True), eos, pad, accelerator)
    assert sample(3, top_k=1) == greedy  # one token left: the most likely
    assert sample(4, top_p=1e-6) == greedy  # the smallest set reaching top_p: the most likely alone


def test_top_k_and_top_p_keep_only_their_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(4000, 1)
    probabilities = logits[0].softmax(-1)
    generator = torch.Generator().manual_seed(0)
    drawn = generation.next_tokens(logits, generation.Sampling(1, top_k=2), generator)
    assert set(drawn.tolist()) == {0, 1}
    # top_p just above the first token's probability: the two most likely are needed to reach it.
    top_p = probabilities[0].item() + 0.01
    drawn = generation.next_tokens(logits, generation.Sampling(1, top_p=top_p), generator)
    assert set(drawn.tolist()) == {0, 1}
    share = (drawn == 0).float().mean().item()
    assert share == pytest.approx((probabilities[0] / probabilities[:2].sum()).item(), abs=0.03)
    drawn = generation.next_tokens(logits, generation.Sampling(1, temperature=1e-4), generator)
    assert set(drawn.tolist()) == {0}


def test_a_prompt_too_long_for_the_positions_keeps_its_last_tokens(model):
    limit = model.config.n_positions
    prompt = list(range(3, 3 + limit))
    fitted = generation.fitted_prompts([prompt, [5, 6]], model.config, max_new_tokens=10)
    assert fitted == [prompt[-(limit - 10) :], [5, 6]]


def test_each_steps_source_follows_lmbda_and_seq_kd_the_same_on_every_call():
    def sources(lmbda: float, seq_kd: bool) -> list[str]:
        settings = SimpleNamespace(lmbda=lmbda, seq_kd=seq_kd)
        return [responses.step_source(settings, 7, step) for step in range(1, 2001)]

    assert set(sources(0.0, False)) == {"data"} and set(sources(0.0, True)) == {"teacher"}
    assert set(sources(1.0, False)) == {"student"} == set(sources(1.0, True))
    mixed = sources(0.3, True)
    assert mixed == sources(0.3, True)
    assert set(mixed) == {"student", "teacher"}
    assert mixed.count("student") / len(mixed) == pytest.approx(0.3, abs=0.04)


@pytest.fixture(scope="module")
def twin_teacher(tmp_path_factory, tokenizer):
    """A 1-layer teacher without dropout: the student built from its layers (student.init teacher_layers) is an
    exact copy of it."""
    return save_gpt2(
        tmp_path_factory.mktemp("twin"), tokenizer, nb_layers=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "full logits"])
def test_a_student_equal_to_its_teacher_has_zero_loss_and_gradients_on_its_samples(
    tmp_path, config_values, twin_teacher, fused
):
    config_values["teacher"]["name"] = str(twin_teacher)
    config_values["student"] = {"init": "teacher_layers", "teacher_layers": [0]}
    config_values["responses"] = {"lmbda": 1.0, "max_new_tokens": 8}
    config_file = write_config(tmp_path / "config.yaml", config_values)
    trainer = trainer_for(config_file, "twin")
    data_step = next(iter(trainer.batches.epoch(0, 0)))
    step = trainer.responses.prepare(data_step, 1)
    assert step.targets == sum(batch["target_tokens"] for batch in step.batches) > 0
    student, teacher = trainer.networks.student_model, trainer.networks.teacher_model
    student.eval()  # the student's dropout is what differs between the copies in training mode
    for divergence in DIVERGENCES:
        criterion = loss.DistillationLoss(alpha=1.0, beta=0.5, divergence=divergence).run_as(fused=fused)
        criterion = criterion.without_cross_entropy()
        for batch in step.batches:
            student.zero_grad()
            outputs = [loss.ModelOutput(*output) for output in _outputs(student, teacher, batch, fused)]
            output = criterion(*outputs, batch["labels"])
            output.loss.backward()
            assert output.kd.item() == pytest.approx(0.0, abs=1e-6), divergence
            assert output.ce.item() > 0  # computed and reported, weighted 0
            gradients = [parameter.grad for parameter in student.parameters() if parameter.grad is not None]
            assert max(gradient.abs().max().item() for gradient in gradients) < 1e-6, divergence


def _outputs(student, teacher, batch, fused: bool):
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    results = []
    for network in (student, teacher):
        with torch.set_grad_enabled(network is student):
            output = network(**inputs, output_hidden_states=True)
        hidden = output.hidden_states[-1]
        head = network.get_output_embeddings().weight
        results.append((None, hidden, head) if fused else (output.logits, None, None))
    return results


def test_a_generated_step_is_normalised_per_generated_token_over_its_micro_batches(tmp_path, config_values):
    """Two micro-batches of generated responses: the step's weighted losses add up to the mean divergence over all
    the step's generated tokens, computed here from the full logits, token by token."""
    config_values["responses"] = {"lmbda": 1.0, "max_new_tokens": 6}
    config_values["training_parameters"]["gradient_accumulation_steps"] = 2
    config_values["training_parameters"]["loss"] = {"()": "loss.DistillationLoss", "divergence": "reverse_kl"}
    trainer = trainer_for(write_config(tmp_path / "config.yaml", config_values), "normalised")
    data_step = next(iter(trainer.batches.epoch(0, 0)))
    assert len(data_step.batches) == 2
    step = trainer.responses.prepare(data_step, 1)
    trainer.networks.student_model.eval()
    weighted, divergence_sum, targets = 0.0, 0.0, 0
    with torch.no_grad():
        for batch, data_batch in zip(step.batches, data_step.batches, strict=True):
            assert batch[responses.SOURCE_KEY] == "student"
            # The prompt is not scored, every generated token (EOS included) is.
            prompt_ends = [len(prompt) for prompt in data_batch["prompts"]]
            for row, end in enumerate(prompt_ends):
                labels = batch["labels"][row]
                assert (labels[:end] == batching.IGNORE_INDEX).all() and labels[end] != batching.IGNORE_INDEX
            weighted += trainer._loss(batch).loss.item() * batch["target_tokens"] / step.targets
            student = trainer.networks.student_model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            )
            teacher = trainer.networks.teacher_model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            )
            mask = batch["labels"][:, 1:] != batching.IGNORE_INDEX
            student_log_probs = student.logits[:, :-1][mask].log_softmax(-1)
            teacher_log_probs = teacher.logits[:, :-1][mask].log_softmax(-1)
            # reverse KL: KL(student || teacher), summed over the vocabulary at each generated position
            divergence_sum += (student_log_probs.exp() * (student_log_probs - teacher_log_probs)).sum().item()
            targets += int(mask.sum())
    assert targets == step.targets
    assert weighted == pytest.approx(divergence_sum / targets, rel=1e-4)  # alpha 1; CE weighted 0 on samples


def test_lmbda_0_trains_exactly_as_a_run_without_generation(tmp_path, config_values):
    """responses.lmbda 0 (and seq_kd false) whatever the generation settings: the same records and the same weights,
    bit for bit, as a config without a responses section; no prompts travel with the batches."""
    config_values["training_parameters"].update(max_steps=6, eval_every_steps=3)
    plain_file = write_config(tmp_path / "plain.yaml", config_values)
    config_values["responses"] = {"lmbda": 0.0, "seq_kd": False, "max_new_tokens": 5, "temperature": 0.3, "top_k": 3}
    zero_file = write_config(tmp_path / "zero.yaml", config_values)
    for config_file, name in ((plain_file, "plain"), (zero_file, "zero")):
        assert distill.main(["--config", str(config_file), "--run-name", name]) == 0
    runs = tmp_path / "checkpoints"
    for checkpoint in ("last", "best"):
        expected, actual = weights(runs / "plain" / checkpoint), weights(runs / "zero" / checkpoint)
        assert all(torch.equal(expected[key], actual[key]) for key in expected)
    timing = {"tokens_per_s", "wall_time_s", "peak_memory_mib"}
    plain, zero = (
        [{k: v for k, v in record.items() if k not in timing} for record in read_metrics(runs / name)]
        for name in ("plain", "zero")
    )
    assert zero == plain and "generation_s" not in json.dumps(zero)
    batch = next(iter(trainer_for(zero_file, "batches").batches.train_loader))
    assert "prompts" not in batch


@pytest.fixture(scope="module")
def on_policy_runs(tmp_path_factory, teacher_dir, data_file):
    """A mixed run (lmbda 0.5: student samples and data steps) with checkpoints every 3 steps, done in one go."""
    from helpers import base_config

    root = tmp_path_factory.mktemp("on-policy")
    values = base_config(root, teacher_dir, data_file)
    values["training_parameters"].update(max_steps=8, checkpoint_every_steps=3, eval_every_steps=4)
    values["responses"] = {"lmbda": 0.5, "max_new_tokens": 6}
    config_file = write_config(root / "config.yaml", values)
    assert run_process("--config", str(config_file), "--run-name", "straight") == 0
    return config_file, root / "checkpoints"


def test_a_mixed_run_draws_both_sources_and_records_its_generation(on_policy_runs):
    _, checkpoints = on_policy_runs
    train = [record for record in read_metrics(checkpoints / "straight") if record["split"] == "train"]
    assert sum(record["student_steps"] for record in train) + sum(record["data_steps"] for record in train) == 8
    assert all(record["teacher_steps"] == 0 for record in train)
    assert 0 < sum(record["student_steps"] for record in train) < 8
    assert all(record["generation_s"] >= 0 for record in train)
    assert any(record["generation_s"] > 0 for record in train)


def test_a_killed_on_policy_run_resumes_to_the_straight_runs_samples_and_weights(on_policy_runs):
    """SIGKILL two steps after the checkpoint of step 3, then --resume: the student's samples of steps 4 to 8 are
    drawn again as the straight run drew them (the same tokens trained, step by step, and the same losses), and the
    weights end the same."""
    config_file, checkpoints = on_policy_runs
    status = run_process("--config", str(config_file), "--run-name", "killed", point="step", step=5)
    assert status == -signal.SIGKILL
    assert run_process("--config", str(config_file), "--run-name", "killed", "--resume") == 0
    expected, resumed = weights(checkpoints / "straight" / "last"), weights(checkpoints / "killed" / "last")
    for key in expected:
        assert (expected[key] - resumed[key]).abs().max().item() <= 1e-6, key
    keys = ("split", "step", "samples_seen", "tokens_seen", "student_steps", "data_steps")
    straight, killed = (
        [tuple(record.get(key) for key in keys) for record in read_metrics(checkpoints / name)]
        for name in ("straight", "killed")
    )
    assert killed == straight  # tokens_seen counts the generated tokens: other samples would change it
    losses = [[record["loss"] for record in read_metrics(checkpoints / name)] for name in ("straight", "killed")]
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)


def test_the_gpu_defaults_generate_and_distil_at_gpt2s_vocabulary(tmp_path):
    """bf16 teacher and autocast, GPT-2's tokenizer and a 50260-row teacher (the original's) over a 50257-row
    student, narrow so that emulated bf16 stays quick: the student's samples and the teacher's generations. The
    teacher's 3 extra rows are made its most likely tokens everywhere: a generation that could choose them would
    give the student ids past its vocabulary, so the run ending whole shows they are never chosen."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from assets import hub_standins
    from helpers import base_config

    teacher_dir = tmp_path / "teacher"
    hub_standins.save_gpt2_tokenizer(teacher_dir)
    config = GPT2Config(
        vocab_size=50260, n_positions=256, n_embd=32, n_layer=2, n_head=2, bos_token_id=50256, eos_token_id=50256
    )
    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(config)
    with torch.no_grad():
        direction = torch.randn(32)
        teacher.transformer.ln_f.bias.copy_(direction)
        teacher.transformer.wte.weight[50257:] = 20 * direction  # tied head: logits of 20 |direction|^2 and more
    teacher.save_pretrained(teacher_dir)
    rows = hub_standins.alpaca_gpt4_rows(30, seed=2, mean_words=6.0, max_words=12)
    data = hub_standins.write_rows(tmp_path / "rows.jsonl", rows)
    values = base_config(tmp_path, teacher_dir, data)
    values["teacher"]["dtype"] = "bfloat16"
    values["hardware"]["mixed_precision"] = "bf16"
    values["training_parameters"].update(max_steps=2, batch_size=4, eval_every_steps=None, report_to="none")
    values["training_parameters"]["sample_prompts"] = 1
    values["data"]["max_length"] = 96
    values["responses"] = {"lmbda": 0.5, "seq_kd": True, "max_new_tokens": 5}
    config_file = write_config(tmp_path / "config.yaml", values)
    assert distill.main(["--config", str(config_file), "--run-name", "vocabulary"]) == 0
    run = tmp_path / "checkpoints" / "vocabulary"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["mixed_precision"] == "bf16" and summary["steps"] == 2
    train = [record for record in read_metrics(run) if record["split"] == "train"]
    assert [sum(record[f"{source}_steps"] for record in train) for source in ("student", "teacher")] == [1, 1]
    assert all(record["data_steps"] == 0 for record in train)
    student = weights(run / "best")
    assert student["transformer.wte.weight"].shape == (50257, 32)
    assert all(torch.isfinite(tensor).all() for tensor in student.values())
