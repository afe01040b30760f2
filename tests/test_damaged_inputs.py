"""Every file the program reads, damaged, unreadable or hostile (checkpoints aside: the tests of runs and recovery
have those): one sentence naming the file and the fix, exit code 2, no traceback, and no file of an earlier run
touched; or, for a cache, a warning naming its folder and the cache built again, byte for byte, training alike."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import test_bad_inputs
from test_bad_inputs import Context, alpaca_lines, tree_digest

import distill
from helpers import base_config

# Distilling against the teacher's cached top-k distributions (teacher_cache.py) needs temperature 1.
CACHED_TEACHER = {"teacher.cache_top_k": 8, "training_parameters.loss.temperature": 1.0}
HOSTILE_MARKER = "hacked"


@dataclass
class Earlier(Context):
    """The base config of the cases, and the caches that its earlier runs left."""

    tokenized_cache: Path
    teacher_cache: Path
    arrow_copy: Path  # `datasets`' Arrow copy of the data file, and its caches of the map steps


@pytest.fixture(scope="module")
def context(tmp_path_factory, teacher_dir, data_file, tokenizer) -> Earlier:
    root = tmp_path_factory.mktemp("damaged-inputs")
    values = base_config(root, teacher_dir, data_file)
    values["training_parameters"]["max_steps"] = 2
    values["data"]["max_samples"] = 40  # small splits: the cache cases run whole trainings and tests
    plain = Context(root, values, tokenizer)
    assert distill.main(["--config", plain.config(), "--run-name", "earlier"]) == 0
    assert distill.main(["--config", plain.config(**CACHED_TEACHER), "--run-name", "earlier-cached"]) == 0
    (tokenized,) = (root / "data" / "tokenized").iterdir()
    (cached,) = (root / "data" / "teacher_cache").iterdir()
    (arrow_copy,) = (root / "data" / "hf_cache").iterdir()
    return Earlier(root, values, tokenizer, tokenized, cached, arrow_copy)


# ---------------------------------------------------------------- damage


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble(path: Path) -> None:
    path.write_bytes(b"\x00\xffgarbage" * 8)


def delete(path: Path) -> None:
    path.unlink()


def edit_json(**changes) -> Callable[[Path], None]:
    """Set (or, with None, remove) keys of a JSON file."""

    def edit(path: Path) -> None:
        content = json.loads(path.read_text())
        content.update(changes)
        path.write_text(json.dumps({key: value for key, value in content.items() if value is not None}))

    return edit


def model_copy(context: Context, name: str, damage: dict[str, Callable[[Path], None]]) -> str:
    """A copy of the teacher's directory, each named file damaged as given."""
    directory = context.root / name
    shutil.copytree(context.values["teacher"]["name"], directory)
    for filename, how in damage.items():
        how(directory / filename)
    return str(directory)


def teacher(name: str, **damage) -> Callable[[Context], list[str]]:
    return lambda c: ["--config", c.config(**{"teacher.name": model_copy(c, f"teacher-{name}", damage)})]


def student(name: str, **damage) -> Callable[[Context], list[str]]:
    return lambda c: ["--config", c.config(**{"student.pretrained": model_copy(c, f"student-{name}", damage)})]


def config_text(name: str, text: str | bytes) -> Callable[[Context], list[str]]:
    return lambda c: ["--config", c.data(name, text)]


def data(name: str, content: str | bytes | Callable[[Context], str]) -> Callable[[Context], list[str]]:
    def build(context: Context) -> list[str]:
        text = content(context) if callable(content) else content
        return ["--config", context.config(**{"data.dataset": context.data(name, text)})]

    return build


def alpaca_rows(**changes) -> Callable[[Context], str]:
    """The fixture's rows as jsonl, with `changes` to every row."""

    def text(context: Context) -> str:
        rows = [json.loads(line) for line in Path(context.values["data"]["dataset"]).read_text().splitlines()]
        return alpaca_lines([{**row, **changes} for row in rows])

    return text


def config_directory(context: Context) -> list[str]:
    (context.root / "directory.yaml").mkdir()
    return ["--config", str(context.root / "directory.yaml")]


def data_directory(context: Context) -> list[str]:
    (context.root / "folder.jsonl").mkdir()
    return ["--config", context.config(**{"data.dataset": str(context.root / "folder.jsonl")})]


def billion_laughs() -> str:
    levels = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    return "\n".join(levels) + "\n"


def data_path_through_a_file(context: Context) -> list[str]:
    return ["--config", context.config(**{"data.dataset": str(Path(context.values["data"]["dataset"]) / "a.jsonl")})]


# (case id, a fragment the one-sentence message must contain, how to build the command line)
CASES: list[tuple[str, str, Callable[[Context], list[str]]]] = [
    ("config file is a directory", "is a directory", config_directory),
    (
        "config path through a regular file",
        "does not exist",
        lambda c: ["--config", str(Path(c.config()) / "config.yaml")],
    ),
    ("empty config file", "is empty", config_text("empty.yaml", "")),
    ("config of comments only", "is empty", config_text("comments.yaml", "# seed: 1\n")),
    ("config not UTF-8", "is not UTF-8", config_text("binary.yaml", bytes(range(256)) * 4)),
    ("config of control characters", "not valid YAML", config_text("control.yaml", b"\x00\x01\x02seed\x7f")),
    ("config that is a list", "holds a list", config_text("list.yaml", "- seed\n- 1\n")),
    ("config that is a scalar", "holds a str", config_text("scalar.yaml", "seed\n")),
    (
        "yaml that runs a command",
        "would run Python code",
        lambda c: [
            "--config",
            c.data("apply.yaml", f'seed: !!python/object/apply:os.system ["touch {c.root / HOSTILE_MARKER}"]\n'),
        ],
    ),
    (
        "yaml that names a function",
        "would run Python code",
        config_text("name.yaml", "seed: !!python/name:os.system\n"),
    ),
    ("yaml billion laughs", "billion laughs", config_text("laughs.yaml", billion_laughs())),
    ("yaml alias holding itself", "endless", config_text("loop.yaml", "seed: &loop [*loop]\n")),
    ("yaml nested too deep", "levels deep", config_text("deep.yaml", "seed: " + "[" * 3000 + "]" * 3000 + "\n")),
    (
        "--set of malformed YAML",
        "is not valid YAML",
        lambda c: ["--config", c.config(), "--set", "training_parameters.batch_size=[8"],
    ),
    ("data path is a directory", "holds no data file", data_directory),
    ("data path through a regular file", "does not exist", data_path_through_a_file),
    ("empty data file", "empty.jsonl is empty", data("empty.jsonl", "")),
    ("blank data file", "blank.csv is empty", data("blank.csv", "\n\n  \n")),
    ("truncated JSON line", "truncated.jsonl as json", data("truncated.jsonl", lambda c: alpaca_rows()(c)[:-30])),
    ("garbage in a jsonl file", "garbage.jsonl as json", data("garbage.jsonl", b"\x00\x01\x02\x03" * 64)),
    ("JSON object, not records", "object.json is in none of the formats read here", data("object.json", '{"a": 1}')),
    ("JSON list of numbers", "numbers.json is in none of the formats read here", data("numbers.json", "[1, 2, 3]")),
    ("instruction a number", "'instruction' of", data("number.jsonl", alpaca_rows(instruction=5))),
    ("instruction null everywhere", "null in every row", data("null.jsonl", alpaca_rows(instruction=None))),
    ("output a record", "records or lists", data("record.jsonl", alpaca_rows(output={"text": "x"}))),
    (
        "teacher weights truncated",
        "model.safetensors is damaged",
        teacher("truncated", **{"model.safetensors": truncate}),
    ),
    ("teacher weights garbage", "model.safetensors is damaged", teacher("garbage", **{"model.safetensors": garble})),
    (
        "teacher config.json garbage",
        "config.json is not a valid model file",
        teacher("config-garbage", **{"config.json": garble}),
    ),
    (
        "teacher config.json a list",
        "not an object",
        teacher("config-list", **{"config.json": lambda path: path.write_text("[1, 2]")}),
    ),
    (
        "teacher config.json without model_type",
        "no model_type",
        teacher("no-type", **{"config.json": edit_json(model_type=None)}),
    ),
    (
        "teacher config.json of a T5",
        "repair or replace the files",
        teacher("t5", **{"config.json": edit_json(model_type="t5")}),
    ),
    (
        "teacher config.json of a BERT",
        "do not fit its config.json",
        teacher("bert", **{"config.json": edit_json(model_type="bert", architectures=["BertLMHeadModel"])}),
    ),
    (
        "teacher tokenizer files missing",
        "holds no token",
        teacher("no-tokenizer", **{"tokenizer.json": delete, "tokenizer_config.json": delete}),
    ),
    (
        "teacher tokenizer.json garbage",
        "tokenizer.json is not a valid tokenizer file",
        teacher("tokenizer-garbage", **{"tokenizer.json": garble}),
    ),
    (
        "teacher tokenizer.json empty",
        "tokenizer.json is not a valid tokenizer file",
        teacher("tokenizer-empty", **{"tokenizer.json": lambda path: path.write_text("{}")}),
    ),
    (
        "teacher tokenizer_config.json garbage",
        "tokenizer_config.json is not",
        teacher("tokenizer-config", **{"tokenizer_config.json": garble}),
    ),
    (
        "teacher directory is a file",
        "a file; ",
        lambda c: ["--config", c.config(**{"teacher.name": c.data("teacher-file", "not a model")})],
    ),
    ("student weights truncated", "set student.pretrained", student("truncated", **{"model.safetensors": truncate})),
    (
        "student config.json garbage",
        "config.json is not a valid model file",
        student("config-garbage", **{"config.json": garble}),
    ),
    (
        "student config.json of a BERT",
        "do not fit its config.json",
        student("bert", **{"config.json": edit_json(model_type="bert", architectures=["BertLMHeadModel"])}),
    ),
]


@pytest.mark.parametrize("fragment, build", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_damaged_input_is_one_sentence_exit_2_and_harms_nothing(context, capsys, fragment, build):
    test_bad_inputs.test_bad_input_is_one_sentence_exit_2_and_harms_nothing(context, capsys, fragment, build)
    assert not (context.root / HOSTILE_MARKER).exists()


# ---------------------------------------------------------------- caches: built again


def cache_contents(directory: Path) -> dict:
    """Every file's hash; meta.json as values, without the seconds that its build took."""
    contents = tree_digest(directory)
    if (directory / "meta.json").is_file():
        contents["meta.json"] = {
            key: value for key, value in json.loads((directory / "meta.json").read_text()).items() if key != "seconds"
        }
    return contents


# (which cache, its files to damage, the damage, whether the damage is seen: `datasets`' caches of a map step are
# never read, so their damage is not even noticed)
CACHE_CASES = [
    ("tokenized", "train/data-00000-of-00001.arrow", truncate, True),
    ("tokenized", "train/state.json", delete, True),
    ("tokenized", "validation/dataset_info.json", garble, True),
    ("tokenized", "dataset_dict.json", delete, True),
    ("teacher", "train/ids.npy", truncate, True),
    ("teacher", "validation/offsets.npy", delete, True),
    ("teacher", "meta.json", garble, True),
    ("arrow copy", "json/*/*/*/json-train.arrow", truncate, True),
    ("arrow copy", "json/*/*/*/cache-*.arrow", garble, False),
]


@pytest.mark.parametrize(
    "cache, pattern, damage, seen", CACHE_CASES, ids=[f"{case[0]} {case[1]} {case[2].__name__}" for case in CACHE_CASES]
)
def test_a_damaged_cache_is_built_again_and_trains_alike(context, capsys, cache, pattern, damage, seen):
    directory = {
        "tokenized": context.tokenized_cache,
        "teacher": context.teacher_cache,
        "arrow copy": context.arrow_copy,
    }[cache]
    # The Arrow copy of the data is read only to build the tokenized data again.
    caches = [directory, context.tokenized_cache] if cache == "arrow copy" else [directory]
    before = cache_contents(directory)
    intact = [shutil.copytree(folder, context.root / f"intact-{index}") for index, folder in enumerate(caches)]
    damaged = list(directory.glob(pattern))
    assert damaged
    for path in damaged:
        damage(path)
    if cache == "arrow copy":
        shutil.rmtree(context.tokenized_cache)
    run = f"rebuilt-{cache.replace(' ', '-')}-{pattern.rpartition('/')[2].replace('*', 'x')}-{damage.__name__}"
    try:
        assert (
            distill.main(
                ["--config", context.config(**CACHED_TEACHER if cache == "teacher" else {}), "--run-name", run]
            )
            == 0
        )

        printed = capsys.readouterr().err
        assert (f"{directory} is damaged" in printed) == seen and "Traceback" not in printed
        assert cache_contents(directory) == before  # the damaged files are back, byte for byte
        earlier = "earlier-cached" if cache == "teacher" else "earlier"
        summaries = [
            json.loads((context.root / "checkpoints" / name / "summary.json").read_text()) for name in (earlier, run)
        ]
        assert summaries[1]["test"] == summaries[0]["test"]
    finally:  # the next case starts from intact caches, whatever this one left
        for folder, copy in zip(caches, intact):
            shutil.rmtree(folder, ignore_errors=True)
            copy.rename(folder)
