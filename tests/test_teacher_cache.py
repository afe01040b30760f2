"""The cached teacher: its top-k distributions against their definition, the bucketed loss against the full one, and
runs that reuse the cache without loading the teacher."""

from __future__ import annotations

import json
import math
import shutil
import struct

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from test_damaged_runs import run_digest, the_error

import distill
import models
from distillation.settings.config import ConfigError, load_config
from distillation.training import teacher_cache
from helpers import base_config, independent_test_figures, save_gpt2, write_config
from loss import (
    IGNORE_INDEX,
    CachedTeacher,
    cached_teacher_kd_and_cross_entropy,
    divergence_and_cross_entropy,
    kd_and_cross_entropy,
)


def random_case(vocab: int = 11, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(3, 7, vocab, generator=generator, requires_grad=True)
    teacher = torch.randn(3, 7, vocab, generator=generator) * 2
    labels = torch.randint(0, vocab, (3, 7), generator=generator)
    labels[0, 5:] = IGNORE_INDEX
    labels[1, :3] = IGNORE_INDEX
    return student, teacher, labels


def cached(teacher_logits: torch.Tensor, labels: torch.Tensor, top_k: int) -> CachedTeacher:
    """What the cache would hold for these logits, aligned with them (the last position predicts nothing)."""
    next_ids = torch.cat([labels[:, 1:].clamp(min=0), torch.zeros_like(labels[:, :1])], dim=1)
    ids, log_probs, rest, _ = teacher_cache.top_k_distribution(teacher_logits, next_ids, top_k)
    return CachedTeacher(ids, log_probs, rest)


def test_top_k_distribution_follows_its_definition():
    _, teacher, labels = random_case()
    next_ids = labels.clamp(min=0)
    ids, log_probs, rest, target = teacher_cache.top_k_distribution(teacher, next_ids, 4)
    probabilities = F.softmax(teacher.double(), dim=-1)
    for row in range(3):
        for position in range(7):
            p = probabilities[row, position]
            order = torch.argsort(p, descending=True)[:4]
            assert ids[row, position].tolist() == order.tolist()  # most likely first
            assert torch.allclose(log_probs[row, position].double(), p[order].log(), atol=1e-5)
            assert math.exp(rest[row, position]) == pytest.approx(1 - p[order].sum().item(), abs=1e-5)
            assert target[row, position].item() == pytest.approx(p[next_ids[row, position]].log().item(), abs=1e-5)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_a_cache_holding_every_token_gives_the_full_loss_and_gradient(divergence):
    student, teacher, labels = random_case()
    expected = divergence_and_cross_entropy(student, teacher, labels, 1.0, 1.0, 0.3, divergence)
    (expected_gradient,) = torch.autograd.grad(expected.loss, student)
    actual = cached_teacher_kd_and_cross_entropy(student, cached(teacher, labels, 11), labels, 1.0, 0.3, divergence)
    (actual_gradient,) = torch.autograd.grad(actual.loss, student)
    assert actual.kd.item() == pytest.approx(expected.kd.item(), abs=1e-5)
    assert actual.ce.item() == pytest.approx(expected.ce.item(), abs=1e-6)
    assert torch.allclose(actual_gradient, expected_gradient, atol=1e-6)


def test_top_k_kd_is_the_kl_between_the_merged_distributions():
    """Independent formula: merge every token outside the teacher's top k into one outcome, per position."""
    student, teacher, labels = random_case()
    actual = cached_teacher_kd_and_cross_entropy(student, cached(teacher, labels, 3), labels, 1.0, 0.0)
    values = []
    for row in range(3):
        for position in range(6):
            if labels[row, position + 1] == IGNORE_INDEX:
                continue
            p = F.softmax(teacher[row, position].double(), dim=-1)
            q = F.softmax(student[row, position].detach().double(), dim=-1)
            top = torch.argsort(p, descending=True)[:3]
            rest = torch.ones_like(p, dtype=torch.bool)
            rest[top] = False
            p_merged = torch.cat([p[top], p[rest].sum()[None]])
            q_merged = torch.cat([q[top], q[rest].sum()[None]])
            values.append((p_merged * (p_merged / q_merged).log()).sum())
    assert actual.kd.item() == pytest.approx(torch.stack(values).mean().item(), abs=1e-5)
    full = kd_and_cross_entropy(student, teacher, labels, 1.0, 1.0, 0.0).kd
    assert actual.kd.item() <= full.item() + 1e-6  # merging outcomes never increases a divergence


def cached_config(tmp_path, teacher_dir, data_file, **loss_overrides) -> dict:
    values = base_config(tmp_path, teacher_dir, data_file)
    values["teacher"]["cache_top_k"] = 8
    values["training_parameters"]["loss"].update(temperature=1.0, **loss_overrides)
    return values


def test_runs_after_the_first_reuse_the_cache_without_loading_the_teacher(
    tmp_path, teacher_dir, data_file, monkeypatch
):
    config_file = write_config(tmp_path / "config.yaml", cached_config(tmp_path, teacher_dir, data_file))
    assert distill.main(["--config", str(config_file), "--run-name", "builds"]) == 0
    caches = list((tmp_path / "data" / "teacher_cache").iterdir())
    assert len(caches) == 1 and json.loads((caches[0] / "meta.json").read_text())["top_k"] == 8

    def no_teacher(*_arguments, **_keywords):
        raise AssertionError("the teacher was loaded although its cache exists")

    monkeypatch.setattr(models, "load_teacher", no_teacher)
    assert distill.main(["--config", str(config_file), "--run-name", "reuses"]) == 0
    first, second = (tmp_path / "checkpoints" / name for name in ("builds", "reuses"))
    for key, tensor in safetensors.torch.load_file(str(first / "last" / "model.safetensors")).items():
        assert torch.equal(tensor, safetensors.torch.load_file(str(second / "last" / "model.safetensors"))[key])
    summaries = [json.loads((run / "summary.json").read_text()) for run in (first, second)]
    assert summaries[0]["test"] == summaries[1]["test"]
    assert 0 < summaries[1]["test"]["top1_agreement"] <= 1 and summaries[1]["test"]["kd"] > 0


def test_the_cached_teacher_figures_match_the_teacher_itself(tmp_path, teacher_dir, data_file):
    """A cache of every token (K = vocabulary) trains and evaluates like the live teacher, up to float16 storage."""
    values = cached_config(tmp_path, teacher_dir, data_file)
    values["teacher"]["cache_top_k"] = None
    live_file = write_config(tmp_path / "live.yaml", values)
    vocab = json.loads((teacher_dir / "config.json").read_text())["vocab_size"]
    values["teacher"]["cache_top_k"] = vocab
    cached_file = write_config(tmp_path / "cached.yaml", values)
    assert distill.main(["--config", str(live_file), "--run-name", "live"]) == 0
    assert distill.main(["--config", str(cached_file), "--run-name", "cached"]) == 0
    live, from_cache = (
        json.loads((tmp_path / "checkpoints" / name / "summary.json").read_text()) for name in ("live", "cached")
    )
    assert from_cache["teacher"]["test"]["perplexity"] == pytest.approx(live["teacher"]["test"]["perplexity"], rel=1e-3)
    for key in ("loss", "kd", "ce", "kl_teacher", "top1_agreement"):
        assert from_cache["test"][key] == pytest.approx(live["test"][key], rel=2e-3, abs=2e-3), key


@pytest.mark.parametrize(
    "setting, value, sentence",
    [
        ("temperature", 2.0, "set the loss temperature to 1"),
        ("packing", True, "set data.packing to false"),
    ],
)
def test_a_cache_refuses_what_it_cannot_serve(tmp_path, teacher_dir, data_file, setting, value, sentence):
    values = cached_config(tmp_path, teacher_dir, data_file)
    if setting == "packing":
        values["data"]["packing"] = value
    else:
        values["training_parameters"]["loss"][setting] = value
    with pytest.raises(ConfigError, match=sentence):
        load_config(write_config(tmp_path / "config.yaml", values))


def test_the_cache_key_follows_the_teacher_and_k(tmp_path, teacher_dir, data_file):
    import dataset

    config = load_config(write_config(tmp_path / "config.yaml", cached_config(tmp_path, teacher_dir, data_file)))
    tokenizer = models.load_tokenizer(str(teacher_dir))
    splits = dataset.prepare_splits(
        dataset.spec_from_config(config), tokenizer, config.paths.data_folder, config.paths.token_dataset
    )
    root = tmp_path / "cache"

    def key(teacher, top_k):
        return teacher_cache.cache_directory(root, str(teacher), torch.float32, "no", splits, top_k, 400)

    assert key(teacher_dir, 8) == key(teacher_dir, 8)
    assert key(teacher_dir, 8) != key(teacher_dir, 16)
    other = tmp_path / "other-teacher"
    shutil.copytree(teacher_dir, other)
    assert key(other, 8) == key(teacher_dir, 8)  # the same weights elsewhere
    weights = safetensors.torch.load_file(str(other / "model.safetensors"))
    weights = {name: tensor + 1 for name, tensor in weights.items()}
    safetensors.torch.save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    assert key(other, 8) != key(teacher_dir, 8)


def sharded_copy(teacher_dir, directory):
    """The teacher saved again in two shards (transformers' own sharding), tokenizer included."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(teacher_dir).save_pretrained(directory, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(directory)
    assert len(list(directory.glob("model-*-of-00002.safetensors"))) == 2
    return directory


def scale_in_place(path, factor: float) -> None:
    """Rewrite a weights file in place with other weights of the same names and shapes (its index stays valid)."""
    tensors = safetensors.torch.load_file(str(path))
    safetensors.torch.save_file(
        {name: tensor * factor for name, tensor in tensors.items()}, str(path), {"format": "pt"}
    )


def test_a_sharded_teacher_rewritten_in_place_builds_a_new_cache_and_refuses_its_resume(
    tmp_path, teacher_dir, data_file, capsys
):
    """The teacher's second shard (its last block and final norm) replaced by other weights, the index untouched:
    the next run distils against the new teacher, and the run distilled from the old one is not resumed with it."""
    teacher = sharded_copy(teacher_dir, tmp_path / "teacher")
    values = cached_config(tmp_path, teacher, data_file)
    values["training_parameters"].update(max_steps=2, sample_prompts=0)
    config_file = write_config(tmp_path / "config.yaml", values)
    assert distill.main(["--config", str(config_file), "--run-name", "old"]) == 0
    old = tmp_path / "checkpoints" / "old"
    before = run_digest(old)
    capsys.readouterr()
    # K decides the distillation target too: the run is not resumed against the whole distribution either.
    assert (
        distill.main(
            ["--config", str(config_file), "--run-name", "old", "--resume", "--set", "teacher.cache_top_k=null"]
        )
        == 2
    )
    assert "teacher.cache_top_k 8" in the_error(capsys.readouterr().err)

    index = (teacher / "model.safetensors.index.json").read_bytes()
    scale_in_place(teacher / "model-00002-of-00002.safetensors", 4.0)
    assert (teacher / "model.safetensors.index.json").read_bytes() == index
    assert distill.main(["--config", str(config_file), "--run-name", "new"]) == 0
    assert len(list((tmp_path / "data" / "teacher_cache").iterdir())) == 2  # built again, for the new teacher
    summaries = [json.loads((tmp_path / "checkpoints" / name / "summary.json").read_text()) for name in ("old", "new")]
    _, new_teacher_perplexity = independent_test_figures(tmp_path / "checkpoints" / "new", teacher)
    assert summaries[1]["teacher"]["test"]["perplexity"] == pytest.approx(new_teacher_perplexity, rel=2e-3)
    assert abs(summaries[0]["teacher"]["test"]["perplexity"] / new_teacher_perplexity - 1) > 0.1

    capsys.readouterr()
    assert distill.main(["--config", str(config_file), "--run-name", "old", "--resume"]) == 2
    assert "another teacher" in the_error(capsys.readouterr().err)
    assert run_digest(old) == before  # config.resumed.yaml not written, the checkpoints as they were


def test_the_cache_key_reads_every_teacher_file_whole(tmp_path, teacher_dir, tokenizer):
    """A change anywhere in any file that decides the teacher's outputs gives another key: the middle of one large
    file, a shard of a teacher saved as .bin shards; so does the autocast the cache is built under."""

    def key(teacher, mixed_precision="no"):
        return teacher_cache.cache_directory(
            tmp_path / "cache", str(teacher), torch.float32, mixed_precision, {}, 8, 400
        )

    large = save_gpt2(tmp_path / "large", tokenizer, nb_layers=3, width=128)
    weights_file = large / "model.safetensors"
    content = weights_file.read_bytes()
    assert len(content) > 2.4 * (1 << 20)
    before = key(large)
    data_start = 8 + int.from_bytes(content[:8], "little")
    middle = data_start + (len(content) // 2 - data_start) // 4 * 4  # a float32 of some tensor
    (value,) = struct.unpack("<f", content[middle : middle + 4])
    with open(weights_file, "r+b") as handle:
        handle.seek(middle)
        handle.write(struct.pack("<f", value + 1.0))
    changed = weights_file.read_bytes()
    assert changed[: 1 << 20] == content[: 1 << 20] and changed[-(1 << 20) :] == content[-(1 << 20) :]
    assert key(large) != before

    sharded_bin = tmp_path / "sharded-bin"
    sharded_bin.mkdir()
    shutil.copy(teacher_dir / "config.json", sharded_bin / "config.json")
    tensors = safetensors.torch.load_file(str(teacher_dir / "model.safetensors"))
    names = sorted(tensors)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for shard, shard_names in shards.items():
        torch.save({name: tensors[name] for name in shard_names}, sharded_bin / shard)
    weight_map = {name: shard for shard, shard_names in shards.items() for name in shard_names}
    (sharded_bin / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    before = key(sharded_bin)
    second = sharded_bin / "pytorch_model-00002-of-00002.bin"
    torch.save({name: tensors[name] * 2 for name in shards[second.name]}, second)
    assert key(sharded_bin) != before

    assert key(teacher_dir, "bf16") != key(teacher_dir, "no")
