"""Configuration: loaded with configue, validated once, read-only; every mistake is one sentence and exit code 2."""

from __future__ import annotations

import copy
import dataclasses
import typing
from pathlib import Path

import pytest

import distill
import loss
from distillation.settings import config_guard, schema
from distillation.settings.config import ConfigError, load_config, to_plain_dict
from helpers import REPO, write_config
from loss import ClassicLoss, DistillationLoss


@pytest.fixture(scope="module")
def plain_config(tmp_path_factory) -> Path:
    """A config of defaults (nothing of it is loaded: the checks here are the config's own)."""
    return write_config(tmp_path_factory.mktemp("plain") / "plain.yaml", {"name": "plain"})


def test_shipped_configs_are_valid():
    main = load_config(REPO / "config.yaml")
    assert main.teacher.name == "vicgalle/gpt2-alpaca-gpt4" and main.distilled_model.nb_layers == 6
    assert main.data.dataset == "vicgalle/alpaca-gpt4"
    assert type(main.training_parameters.loss) is DistillationLoss
    tiny = load_config(REPO / "configs" / "tiny.yaml")
    assert tiny.name == "tiny" and tiny.teacher.name == "assets/tiny/teacher"
    on_policy = load_config(REPO / "configs" / "tiny_on_policy.yaml")  # the demo's teacher and data, on-policy
    assert (on_policy.teacher, on_policy.data) == (tiny.teacher, tiny.data) and on_policy.responses.lmbda == 1
    assert type(load_config(REPO / "configs" / "tiny_teacher.yaml").training_parameters.loss) is ClassicLoss
    ddp, fsdp = (load_config(REPO / "configs" / f"gpt2_8gpu_{name}.yaml") for name in ("ddp", "fsdp"))
    assert (ddp.hardware.distributed, fsdp.hardware.distributed) == ("ddp", "fsdp")
    assert repr(ddp.training_parameters) == repr(fsdp.training_parameters) and ddp.data == fsdp.data  # same run


def test_seed_keys_keep_their_meaning(config_file):
    config = load_config(config_file)
    training = config.training_parameters
    assert (training.checkpoints_name_last, training.checkpoints_name_best, training.resume) == ("last", "best", False)
    assert config.paths.token_dataset == "tokenized" and config.seed == 3
    assert training.loss.spec() == {"()": "loss.DistillationLoss", "alpha": 1.0, "beta": 0.5, "temperature": 2.0}


def test_yaml_1_1_exponent_strings_become_floats(tmp_path, config_values):
    text = write_config(tmp_path / "c.yaml", config_values).read_text()
    text = text.replace("learning_rate: 0.003", "learning_rate: 3e-4")
    assert "3e-4" in text
    (tmp_path / "c.yaml").write_text(text)
    assert load_config(tmp_path / "c.yaml").training_parameters.learning_rate == pytest.approx(3e-4)


def test_whole_numbers_in_exponent_form_are_whole_numbers(plain_config):
    """YAML 1.1 reads `1e3` as text: a whole number written so counts, as `3e-4` counts as a number; a quoted "8"
    stays text, and `1.5e0` is no whole number."""
    assert load_config(plain_config, ["training_parameters.max_steps=1e3"]).training_parameters.max_steps == 1000
    for text in ("'8'", "1.5e0"):
        with pytest.raises(ConfigError, match="batch_size is .*; it must be a whole number at least 1"):
            load_config(plain_config, [f"training_parameters.batch_size={text}"])


def test_config_is_read_only(config_file):
    config = load_config(config_file)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.training_parameters.learning_rate = 1.0


def test_name_defaults_to_the_file_stem(tmp_path, config_values):
    del config_values["name"]
    assert load_config(write_config(tmp_path / "my-experiment.yaml", config_values)).name == "my-experiment"


def test_overrides_are_typed_and_reach_the_loss(config_file):
    config = load_config(
        config_file,
        [
            "training_parameters.batch_size=4",
            "training_parameters.learning_rate=1e-4",
            "training_parameters.loss.temperature=3",
            "data.split.train=0.5",
            "data.split.validation=0.3",
        ],
    )
    assert config.training_parameters.batch_size == 4
    assert config.training_parameters.learning_rate == pytest.approx(1e-4)
    assert config.training_parameters.loss.temperature == 3.0
    assert config.data.split.train == 0.5


def test_override_can_switch_to_plain_training(config_file):
    config = load_config(config_file, ["training_parameters.loss={'()': loss.ClassicLoss}"])
    assert isinstance(config.training_parameters.loss, ClassicLoss)


def test_the_loss_configue_builds_is_the_criterion_the_run_uses(config_file):
    config = load_config(config_file)
    criterion = config.training_parameters.loss
    assert type(criterion) is DistillationLoss and (criterion.alpha, criterion.beta, criterion.temperature) == (
        1,
        0.5,
        2,
    )
    trainer = distill.setup(config, "criterion", False)
    assert trainer.criterion is criterion
    # One process on a CPU: fused, as its class and name still say DistillationLoss.
    assert criterion.projects_hidden_states and type(criterion) is DistillationLoss
    assert to_plain_dict(config)["training_parameters"]["loss"] == {
        "()": "loss.DistillationLoss",
        "alpha": 1.0,
        "beta": 0.5,
        "temperature": 2.0,
    }


def test_the_criteria_a_config_may_name_are_the_criteria_of_loss_py():
    offered = {
        f"loss.{value.__name__}"
        for value in vars(loss).values()
        if isinstance(value, type) and issubclass(value, loss.Criterion) and value is not loss.Criterion
    }
    assert set(config_guard.CRITERIA) == offered and len(config_guard.CRITERIA) == len(offered)
    assert config_guard.criterion_path("ClassicLoss") == "loss.ClassicLoss"
    assert config_guard.criterion_path("loss.Criterion") is None and config_guard.criterion_path("os.system") is None


def test_resolved_config_round_trips(tmp_path, config_file):
    config = load_config(config_file, ["training_parameters.loss.alpha=0.25"])
    again = load_config(write_config(tmp_path / "resolved.yaml", to_plain_dict(config)))
    assert to_plain_dict(again) == to_plain_dict(config)


def _set(values: dict, dotted: str, value) -> dict:
    values = copy.deepcopy(values)
    *parents, last = dotted.split(".")
    node = values
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return values


BAD_VALUES = [
    ("training_parameters.lerning_rate", 0.1, "did you mean learning_rate"),
    ("training_parameters.learning_rate", "fast", "learning_rate"),
    ("training_parameters.learning_rate", 0, "learning_rate"),
    ("training_parameters.learning_rate", -1e-3, "learning_rate"),
    ("training_parameters.batch_size", 0, "batch_size"),
    ("training_parameters.batch_size", 2.5, "batch_size"),
    ("training_parameters.nb_epochs", -1, "nb_epochs"),
    ("training_parameters.resume", "yes", "resume"),
    ("training_parameters.optimizer", "adam", "optimizer"),
    ("training_parameters.loss", {"()": "loss.DistillationLoss", "temperature": 0}, "temperature"),
    ("training_parameters.loss", {"()": "loss.DistillationLoss", "alpha": 0, "beta": 0}, "both 0"),
    ("training_parameters.loss", {"()": "loss.DistillationLoss", "alpah": 1}, "alpah"),
    ("training_parameters.loss", {"()": "loss.NoSuchLoss"}, "NoSuchLoss"),
    ("training_parameters.loss", "kd", "loss"),
    ("training_parameters.checkpoints_name_best", "last", "different names"),
    ("training_parameters.checkpoints_name_last", "../elsewhere", "checkpoints_name_last"),
    ("distilled_model.nb_layers", 0, "nb_layers"),
    ("data.split.train", 0.7, "sum to"),
    ("data.max_length", 1, "max_length"),
    ("hardware.device", "tpu", "device"),
    ("hardware.mixed_precision", "fp8", "mixed_precision"),
    ("paths", "here", "paths"),
    ("name", "a/b", "name"),
]


@pytest.mark.parametrize("key, value, fragment", BAD_VALUES, ids=[f"{key}={value}" for key, value, _ in BAD_VALUES])
def test_bad_values_are_one_sentence_and_exit_2(tmp_path, config_values, capsys, key, value, fragment):
    path = write_config(tmp_path / "bad.yaml", _set(config_values, key, value))
    with pytest.raises(ConfigError, match=fragment):
        load_config(path)
    assert distill.main(["--config", str(path)]) == 2
    printed = capsys.readouterr().err
    assert len([line for line in printed.splitlines() if "error:" in line]) == 1
    assert "Traceback" not in printed
    assert not (tmp_path / "checkpoints").exists()


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("seed: 1\ntraining_parameters:\n  batch_size: [4\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(path)


def test_missing_config_file(tmp_path):
    assert distill.main(["--config", str(tmp_path / "nowhere.yaml")]) == 2


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("training_parameters.batchsize=4", "unknown key training_parameters.batchsize"),
        ("nosection.key=1", "unknown key nosection"),
        ("training_parameters=1", "section"),
        ("seed.value=1", "single value"),
        ("training_parameters.batch_size", "key.path=value"),
        ("training_parameters.batch_size=many", "batch_size"),
    ],
)
def test_bad_overrides(config_file, override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(config_file, [override])


def test_nb_layers_above_the_teacher_is_refused_before_anything_is_written(tmp_path, config_values):
    path = write_config(tmp_path / "deep.yaml", _set(config_values, "distilled_model.nb_layers", 3))
    assert distill.main(["--config", str(path)]) == 2
    assert not (tmp_path / "checkpoints").exists()


def test_unavailable_cuda_is_refused(tmp_path, config_values):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    path = write_config(tmp_path / "cuda.yaml", _set(config_values, "hardware.device", "cuda"))
    assert distill.main(["--config", str(path)]) == 2


def test_max_length_above_the_model_positions_is_refused(tmp_path, config_values):
    path = write_config(tmp_path / "long.yaml", _set(config_values, "data.max_length", 4096))
    assert distill.main(["--config", str(path)]) == 2
    assert not Path(config_values["paths"]["checkpoints"]).exists()


# ---------------------------------------------------------------- student.init / student.teacher_layers


def test_student_init_defaults_to_random_and_accepts_a_layer_list(tmp_path, config_values):
    assert load_config(write_config(tmp_path / "default.yaml", config_values)).student.init == "random"
    values = _set(_set(config_values, "student.init", "teacher_layers"), "student.teacher_layers", [1])
    config = load_config(write_config(tmp_path / "listed.yaml", values))
    assert (config.student.init, config.student.teacher_layers) == ("teacher_layers", [1])
    again = load_config(write_config(tmp_path / "resolved.yaml", to_plain_dict(config)))
    assert again.student == config.student
    overridden = load_config(tmp_path / "listed.yaml", ["distilled_model.nb_layers=2", "student.teacher_layers=[0, 1]"])
    assert overridden.student.teacher_layers == [0, 1]
    uniform = load_config(write_config(tmp_path / "uniform.yaml", _set(config_values, "student.init", "uniform")))
    assert (uniform.student.init, uniform.student.teacher_layers) == ("uniform", None)


BAD_STUDENTS = [
    ({"init": "copy"}, 1, r"student.init is 'copy'; it must be one of 'random', 'uniform', 'teacher_layers'\."),
    ({"init": "teacher_layers", "teacher_layers": 1}, 1, r"student.teacher_layers is 1; it must be a list"),
    ({"init": "teacher_layers", "teacher_layers": "0, 1"}, 2, r"student.teacher_layers is '0, 1'; it must be a list"),
    (
        {"init": "teacher_layers", "teacher_layers": [0, "one"]},
        2,
        r"student.teacher_layers\[1\] is 'one'; it must be a whole number at least 0\.",
    ),
    ({"init": "teacher_layers", "teacher_layers": [0, 1.5]}, 2, r"teacher_layers\[1\] is 1.5; it must be a whole"),
    ({"init": "teacher_layers", "teacher_layers": [True]}, 1, r"teacher_layers\[0\] is True; it must be a whole"),
    (
        {"init": "teacher_layers", "teacher_layers": [-1]},
        1,
        r"teacher_layers\[0\] is -1; it must be a whole number at least 0\.",
    ),
    ({"init": "teacher_layers"}, 1, r"student.teacher_layers is null; list the teacher block"),
    (
        {"init": "teacher_layers", "teacher_layers": [0, 1]},
        1,
        r"lists 2 teacher blocks but distilled_model.nb_layers is 1; list exactly one teacher block per student layer",
    ),
    ({"init": "teacher_layers", "teacher_layers": []}, 1, r"lists 0 teacher blocks"),
    ({"init": "teacher_layers", "teacher_layers": [1, 1]}, 2, r"teacher block 1 more than once"),
    ({"teacher_layers": [0]}, 1, r"teacher_layers is set but student.init is 'random'; set student.init to"),
    ({"init": "uniform", "teacher_layers": [0]}, 1, r"student.init is 'uniform'; set student.init to teacher_layers"),
    (
        {"init": "uniform", "pretrained": "distilgpt2"},
        1,
        r"student.init is 'uniform' but student.pretrained is set.*set student.init to random or student.pretrained",
    ),
    ({"init": "teacher_layers", "teacher_layers": [0], "pretrained": "x"}, 1, r"student.pretrained is set"),
]


@pytest.mark.parametrize("student, nb_layers, fragment", BAD_STUDENTS, ids=[str(case[0]) for case in BAD_STUDENTS])
def test_bad_student_init_is_one_sentence_naming_the_fix(tmp_path, config_values, capsys, student, nb_layers, fragment):
    values = _set(_set(config_values, "student", student), "distilled_model.nb_layers", nb_layers)
    path = write_config(tmp_path / "bad.yaml", values)
    with pytest.raises(ConfigError, match=fragment) as raised:
        load_config(path)
    message = str(raised.value)
    assert "\n" not in message and message.endswith(".") and message.count("; ") == 1
    assert distill.main(["--config", str(path)]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists()


HOSTILE_ENTRIES = {
    "a call in another key": lambda values, marker: values.update(
        seed={"()": "os.system", "command": f"touch {marker}"}
    ),
    "a call as the loss": lambda values, marker: values["training_parameters"].update(
        loss={"()": "os.system", "command": f"touch {marker}"}
    ),
    "a call in a list": lambda values, marker: values["data"].update(
        template=[{"()": "os.system", "command": f"touch {marker}"}]
    ),
}


@pytest.mark.parametrize("plant", HOSTILE_ENTRIES.values(), ids=HOSTILE_ENTRIES.keys())
def test_a_config_file_cannot_run_code(tmp_path, config_values, capsys, plant):
    """configue calls what a `()` entry names while it loads: only a loss class of this project may be named, and
    anything else is refused before it runs, with one sentence and exit code 2."""
    marker = tmp_path / "PWNED"
    plant(config_values, marker)
    path = write_config(tmp_path / "hostile.yaml", config_values)
    assert distill.main(["--config", str(path)]) == 2
    assert not marker.exists()
    assert not (tmp_path / "checkpoints").exists()
    printed = capsys.readouterr().err
    assert len([line for line in printed.splitlines() if "error:" in line]) == 1 and "Traceback" not in printed
    with pytest.raises(ConfigError, match=r"`\(\)` entry|not a loss class"):
        load_config(path)
    assert not marker.exists()


def test_a_config_file_cannot_import_code_or_hide_a_call_in_an_imported_file(tmp_path, config_values, monkeypatch):
    """`!ext` imports a module (whose import runs its code); `!import` pulls in another YAML file, checked the same."""
    marker = tmp_path / "IMPORTED"
    (tmp_path / "side_effect.py").write_text(f"open({str(marker)!r}, 'w').close()\nVALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    text = write_config(tmp_path / "base.yaml", config_values).read_text()
    (tmp_path / "ext.yaml").write_text(text.replace("seed: 3", "seed: !ext side_effect.VALUE"))
    with pytest.raises(ConfigError, match="!ext side_effect.VALUE"):
        load_config(tmp_path / "ext.yaml")
    assert not marker.exists()
    (tmp_path / "part.yaml").write_text(f'"()": os.system\ncommand: touch {marker}\n')
    (tmp_path / "import.yaml").write_text(text.replace("seed: 3", "seed: !import part.yaml"))
    with pytest.raises(ConfigError, match="`\\(\\)` entry"):
        load_config(tmp_path / "import.yaml")
    assert not marker.exists()


def test_an_unquoted_no_is_the_choice_no_not_false(config_file):
    """YAML 1.1 reads `no` as false: `--set hardware.mixed_precision=no`, as a user types it, still means no."""
    assert load_config(config_file, ["hardware.mixed_precision=no"]).hardware.mixed_precision == "no"
    assert load_config(config_file, ["hardware.mixed_precision=auto"]).hardware.mixed_precision == "auto"


# ---------------------------------------------------------------- every number of the schema, at its bounds


def _numeric_keys() -> list[tuple[str, type, bool, dict]]:
    """(key, int or float, whether the value is a list of them, range) of every number the schema holds."""
    keys = []
    for key, kind, metadata, _ in schema.leaves():
        arguments = [argument for argument in typing.get_args(kind) if argument is not type(None)]
        if typing.get_args(kind) and type(None) in typing.get_args(kind):  # X | None
            kind = arguments[0]
        in_list = typing.get_origin(kind) is list
        kind = typing.get_args(kind)[0] if in_list else kind
        if kind in (int, float):
            keys.append((key, kind, in_list, dict(metadata)))
    return keys


def _bound_cases() -> list[tuple[str, str, bool, str]]:
    """(key, the value as --set writes it, accepted?, what the refusal must name) for every numeric key: nan, the
    infinities, text, a boolean, a fraction for a whole number, each bound and the value just past it."""
    cases = []
    for key, kind, in_list, metadata in _numeric_keys():
        low, high, low_open = metadata.get("low"), metadata.get("high"), metadata.get("low_open")
        step = 1 if kind is int else 1e-3
        values = [(".nan", False), (".inf", False), ("-.inf", False), ("many", False), ("true", False)]
        if kind is int:
            values.append((f"{(low or 0) + 0.5}", False))
        if low is not None:
            values += [(str(low), not low_open), (str(low - step), False)]
        if high is not None:
            values += [(str(high), True), (str(high + step), False)]
        word = "whole number" if kind is int else "finite number"
        cases += [(key, f"[{text}]" if in_list else text, ok, word) for text, ok in values]
    return cases


NUMERIC_KEYS = _numeric_keys()
BOUND_CASES = _bound_cases()


def test_the_bound_cases_cover_every_numeric_key():
    assert len(NUMERIC_KEYS) >= 24 and {"seed", "student.teacher_layers", "data.split.test"} <= {
        key for key, *_ in NUMERIC_KEYS
    }
    seed = next(metadata for key, _, _, metadata in NUMERIC_KEYS if key == "seed")
    assert (seed["low"], seed["high"]) == (0, 2**32 - 1)  # numpy's seeding takes no other seed


@pytest.mark.parametrize(
    "key, text, accepted, word", BOUND_CASES, ids=[f"{key}={text}" for key, text, _, _ in BOUND_CASES]
)
def test_every_number_is_checked_for_range_and_finiteness(plain_config, key, text, accepted, word):
    """A value outside a key's range (nan and the infinities included) is one sentence naming the key, the value
    and the whole range; a value at a bound is accepted (or refused by a check across keys, never by its range)."""
    metadata = next(metadata for name, _, _, metadata in NUMERIC_KEYS if name == key)
    if accepted:
        try:
            load_config(plain_config, [f"{key}={text}"])
        except ConfigError as error:
            assert f"; it must be a {word}" not in str(error)
        return
    with pytest.raises(ConfigError) as raised:
        load_config(plain_config, [f"{key}={text}"])
    message = str(raised.value)
    assert message.startswith(f"{plain_config}: {key}") and "\n" not in message and message.count("; ") == 1
    assert word in message.split("; ")[1]
    bounds = [metadata[name] for name in ("low", "high") if metadata.get(name) is not None]
    assert all(f" {bound}" in message.split("; ")[1] for bound in bounds)


# ---------------------------------------------------------------- every way of naming a loss


def _loss_file(tmp_path: Path, loss_text: str | None) -> Path:
    """A config whose training_parameters.loss is written as `loss_text` (YAML), or left out."""
    text = "name: losses\ntraining_parameters:\n  batch_size: 2\n"
    if loss_text is not None:
        text += "  loss:\n" + "".join(f"    {line}\n" for line in loss_text.splitlines())
    (tmp_path / "losses.yaml").write_text(text)
    return tmp_path / "losses.yaml"


DISTILLATION = "(): loss.DistillationLoss\nalpha: 0.5\nbeta: 0.25\ntemperature: 2.0"
SAME_CLASSIC_LOSS = {
    "the file": ("(): loss.ClassicLoss", []),
    "the file, configue's escaped key": ("\\(): loss.ClassicLoss", []),
    "--set of the section": (DISTILLATION, ["training_parameters.loss={'()': loss.ClassicLoss}"]),
    "--set of () alone": (DISTILLATION, ["training_parameters.loss.()=loss.ClassicLoss"]),
    "--set of () alone, no loss in the file": (None, ["training_parameters.loss.()=loss.ClassicLoss"]),
}


@pytest.mark.parametrize("loss_text, overrides", SAME_CLASSIC_LOSS.values(), ids=SAME_CLASSIC_LOSS.keys())
def test_every_way_of_naming_a_loss_gives_the_same_criterion(tmp_path, loss_text, overrides):
    criterion = load_config(_loss_file(tmp_path, loss_text), overrides).training_parameters.loss
    assert type(criterion) is ClassicLoss and criterion.spec() == {"()": "loss.ClassicLoss"}


def test_another_class_named_alone_keeps_the_arguments_it_takes(tmp_path):
    path = _loss_file(tmp_path, DISTILLATION)
    chunked = load_config(path, ["training_parameters.loss.()=loss.ChunkedDistillationLoss"])
    written = load_config(
        path, ["training_parameters.loss={'()': loss.ChunkedDistillationLoss, alpha: 0.5, beta: 0.25, temperature: 2}"]
    )
    assert chunked.training_parameters.loss.spec() == written.training_parameters.loss.spec()
    assert (chunked.training_parameters.loss.alpha, chunked.training_parameters.loss.temperature) == (0.5, 2.0)
    # A loss the file leaves out is the default one: an argument set alone changes it.
    default = load_config(_loss_file(tmp_path, None), ["training_parameters.loss.temperature=3"])
    assert default.training_parameters.loss.spec() == {**schema.DEFAULT_LOSS, "temperature": 3.0}
    assert load_config(_loss_file(tmp_path, "")).training_parameters.loss.spec() == schema.DEFAULT_LOSS
    # A class named without arguments takes its defaults, which are the default loss's.
    named_alone = load_config(_loss_file(tmp_path, "(): loss.DistillationLoss"))
    assert named_alone.training_parameters.loss.spec() == schema.DEFAULT_LOSS


BAD_LOSSES = {
    "a bare class name in the file": (
        "(): ClassicLoss",
        [],
        "'ClassicLoss' names the loss class without its module; write it as loss.ClassicLoss",
    ),
    "a bare class name in --set": (
        DISTILLATION,
        ["training_parameters.loss.()=ClassicLoss"],
        "write it as loss.ClassicLoss",
    ),
    "an argument the class does not take": ("(): loss.ClassicLoss\nalpha: 1", [], "unknown argument 'alpha'"),
    "an argument set with --set that the new class does not take": (
        DISTILLATION,
        ["training_parameters.loss.()=loss.ClassicLoss", "training_parameters.loss.alpha=2"],
        "unknown argument 'alpha'",
    ),
    "a class that is not a criterion": (
        "(): loss.LossOutput",
        [],
        "'loss.LossOutput' is not a loss class of this project",
    ),
    "the criteria's base class": (DISTILLATION, ["training_parameters.loss.()=loss.Criterion"], "not a loss class"),
    "no class": (DISTILLATION, ["training_parameters.loss.()="], "None is not a loss class"),
    "an infinite temperature": (
        DISTILLATION,
        ["training_parameters.loss.temperature=.inf"],
        "temperature must be a finite number > 0, not inf",
    ),
    "an infinite temperature as text": (DISTILLATION, ["training_parameters.loss.temperature=inf"], "not 'inf'"),
    "a weight that is not a number": (
        "(): loss.DistillationLoss\nalpha: .nan",
        [],
        "alpha must be a finite number >= 0, not nan",
    ),
    "an infinite beta": (DISTILLATION, ["training_parameters.loss.beta=.inf"], "beta must be a finite number >= 0"),
    "an infinite hidden weight": (
        DISTILLATION,
        ["training_parameters.loss.hidden_weight=-.inf"],
        "hidden_weight must be a finite",
    ),
    "a skew that is not a number": (
        DISTILLATION,
        ["training_parameters.loss.divergence=skew_kl", "training_parameters.loss.skew=.nan"],
        "skew must be a finite number between 0 and 1",
    ),
}


@pytest.mark.parametrize("loss_text, overrides, fragment", BAD_LOSSES.values(), ids=BAD_LOSSES.keys())
def test_a_loss_that_cannot_be_built_is_one_sentence(tmp_path, loss_text, overrides, fragment):
    with pytest.raises(ConfigError) as raised:
        load_config(_loss_file(tmp_path, loss_text), overrides)
    message = str(raised.value)
    assert fragment in message and "training_parameters.loss" in message and "\n" not in message
    assert message.endswith(".") and "; " in message


# ---------------------------------------------------------------- the YAML files: imports, references, keys twice

MAIN = "name: files\nseed: 1\n"
BAD_FILES = {
    "an !import of a missing file": (
        {"main.yaml": MAIN + "data: !import missing.yaml\n"},
        r"main.yaml line 3: `!import missing.yaml` names \S+/missing.yaml, which is not there; fix the path, which is "
        r"relative to the folder of main.yaml\.",
    ),
    "an !import of a folder": (
        {"main.yaml": MAIN + "data: !import parts\n", "parts/x.yaml": ""},
        "a folder, not a file",
    ),
    "a YAML error in an imported file": (
        {"main.yaml": MAIN + "data: !import parts/data.yaml\n", "parts/data.yaml": "dataset: x\nmax_length: [4\n"},
        r"parts/data.yaml is not valid YAML at line 3, column 1 \(expected ',' or '\]', but got '<stream end>'\); fix",
    ),
    "an imported file that is not UTF-8": (
        {"main.yaml": MAIN + "data: !import data.yaml\n", "data.yaml": b"dataset: caf\xe9\n"},
        r"/data.yaml is not UTF-8 text; save it as UTF-8\.",
    ),
    "a section written twice": (
        {"main.yaml": "training_parameters:\n  batch_size: 4\nseed: 1\ntraining_parameters:\n  nb_epochs: 3\n"},
        r"main.yaml: training_parameters is written twice, at lines 1 and 4, and YAML would keep only the second",
    ),
    "a key written twice": (
        {"main.yaml": MAIN + "hardware:\n  device: cpu\n  compile: true\n  device: cuda\n"},
        r"hardware.device is written twice, at lines 4 and 6",
    ),
    "a key written twice on one line": (
        {"main.yaml": MAIN + "data: {max_length: 8, max_length: 16}\n"},
        r"data.max_length is written twice, on line 3",
    ),
    "a key written twice in an imported file": (
        {"main.yaml": MAIN + "training_parameters: !import t.yaml\n", "t.yaml": "loss:\n  alpha: 1\n  alpha: 2\n"},
        r"/t.yaml: training_parameters.loss.alpha is written twice, at lines 2 and 3",
    ),
    "a missing !cfg path": (
        {"main.yaml": MAIN + "training_parameters:\n  nb_epochs: !cfg training_parameters.epochs\n"},
        r"main.yaml line 4: `!cfg training_parameters.epochs` refers to training_parameters.epochs, which main.yaml "
        r"does not hold; write the path of an existing value",
    ),
    "a !cfg past a list's end": (
        {"main.yaml": MAIN + "data:\n  split: [0.5]\n  max_length: !cfg data.split.1\n"},
        r"refers to data.split.1, which main.yaml does not hold",
    ),
    "a !cfg that refers to itself": (
        {"main.yaml": MAIN + "training_parameters:\n  nb_epochs: !cfg training_parameters.nb_epochs\n"},
        r"main.yaml line 4: this `!cfg` leads back to itself",
    ),
    "an unset environment variable": (
        {"main.yaml": MAIN + "teacher:\n  name: ${DISTILL_TEST_UNSET}/teacher\n"},
        r"main.yaml line 4: \$\{DISTILL_TEST_UNSET\} names the environment variable DISTILL_TEST_UNSET, which is "
        r"not set; set it, or write a default as \$\{DISTILL_TEST_UNSET-value\}\.",
    ),
    "an !import of a missing part": (
        {"main.yaml": MAIN + "training_parameters: !import:train t.yaml\n", "t.yaml": "training:\n  nb_epochs: 2\n"},
        r"`!import:train t.yaml` refers to train, which \S+/t.yaml does not hold",
    ),
}


@pytest.mark.parametrize("files, pattern", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_a_file_that_cannot_be_read_as_written_is_named_with_its_line(tmp_path, files, pattern):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=pattern) as raised:
        load_config(tmp_path / "main.yaml")
    assert "\n" not in str(raised.value) and "`()` entry" not in str(raised.value)


def test_a_key_twice_in_a_set_value_and_a_misread_choice_are_one_sentence(plain_config):
    with pytest.raises(ConfigError, match=r"training_parameters.loss.alpha is written twice, on line 1"):
        load_config(plain_config, ["training_parameters.loss={'()': loss.DistillationLoss, alpha: 1, alpha: 2}"])
    with pytest.raises(ConfigError, match=r"is False \(YAML reads an unquoted yes, no, on or off as true or false\)"):
        load_config(plain_config, ["training_parameters.on_nonfinite_loss=off"])


def test_imports_references_and_merges_still_read_as_written(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_TEST_PART", "t")
    (tmp_path / "t.yaml").write_text("training:\n  nb_epochs: 2\n  batch_size: 4\n")
    (tmp_path / "main.yaml").write_text(
        "seed: 5\ntraining_parameters: !import:training ${DISTILL_TEST_PART}.yaml\nname: ${DISTILL_TEST_UNSET-x}\n"
        "data: &data {max_length: 32, max_samples: !cfg seed}\n"
        "student:\n  <<: {init: uniform, pretrained: null}\n  init: random\n"
    )
    config = load_config(tmp_path / "main.yaml")
    assert (config.training_parameters.nb_epochs, config.training_parameters.batch_size) == (2, 4)
    assert (config.data.max_length, config.data.max_samples, config.student.init) == (32, 5, "random")
    assert config.name == "x"
