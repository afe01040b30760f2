"""The documentation's relative links: every file a link names exists, and every anchor (`page.md#section`, `#section`)
is a heading of that page, as GitHub names it; every page of docs/ can be reached from the README; every command the
pages write names a module or script that exists. A page moved, a heading renamed, a page left unlinked or a module
renamed breaks a test, not a reader's click or copied command."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from helpers import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# [text](target) outside code: the target up to the closing parenthesis (no nested parentheses in these pages).
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but hyphens and underscores dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {github_anchor(line.lstrip("#")) for line in text.splitlines() if re.match(r"#{1,6} ", line)}


def relative_links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]


def test_the_anchor_rule_is_githubs():
    assert github_anchor(" Records, plots and notebooks") == "records-plots-and-notebooks"
    assert github_anchor(" The `tiny` demo: what it costs?") == "the-tiny-demo-what-it-costs"


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_every_relative_link_and_anchor_resolves(page):
    links = relative_links(page)
    broken = []
    for target in links:
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert not broken, f"{page.name}: {broken}"
    if page.name == "README.md":
        assert len(links) > 10  # the pattern still finds the README's links


def reachable_pages(start: Path) -> set[Path]:
    """The Markdown pages a reader reaches from `start` by following relative links, `start` included."""
    reached, waiting = set(), [start.resolve()]
    while waiting:
        page = waiting.pop()
        if page in reached or not page.is_file():
            continue
        reached.add(page)
        for target in relative_links(page):
            path = target.partition("#")[0]
            if path.endswith(".md"):
                waiting.append((page.parent / path).resolve())
    return reached


def unlinked_pages(readme: Path) -> list[str]:
    docs = {page.resolve() for page in (readme.parent / "docs").glob("*.md")}
    return sorted(page.name for page in docs - reachable_pages(readme))


def test_a_page_that_nothing_links_to_is_reported(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("See [usage](docs/usage.md).\n", encoding="utf-8")
    (tmp_path / "docs" / "usage.md").write_text(
        "Back to the [README](../README.md); [more](more.md#a).\n", encoding="utf-8"
    )
    (tmp_path / "docs" / "more.md").write_text("# A\n```\n[in code](orphan.md)\n```\n", encoding="utf-8")
    (tmp_path / "docs" / "orphan.md").write_text("Links [back](../README.md) only.\n", encoding="utf-8")
    assert unlinked_pages(tmp_path / "README.md") == ["orphan.md"]


def test_every_docs_page_is_linked_from_the_readme_or_a_page_it_links():
    assert not unlinked_pages(REPO / "README.md"), "pages no reader reaches from README.md"


# A command as the pages write it, in code spans and blocks: `python3 -m module`, `python3 file.py`, `bash file.sh`.
COMMAND = re.compile(r"\b(?:python3 -m ([\w.]+)|python3 ([\w./-]+\.py)|bash ([\w./-]+))")


def wrong_commands(page: Path) -> tuple[int, list[str]]:
    """How many commands `page` writes, and those that name no module or root script. Modules resolve from the
    repository root (as `python3 -m` finds them there); a script run by its path must be a root file, since the files
    of sub-folders import the package and run as modules."""
    commands = COMMAND.findall(page.read_text(encoding="utf-8"))
    wrong = []
    for module, script, shell_script in commands:
        if module:
            try:
                found = importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:  # a parent package that does not exist
                found = False
            if not found:
                wrong.append(f"python3 -m {module}: no such module")
        elif script and ("/" in script or not (REPO / script).is_file()):
            wrong.append(f"python3 {script}: not a script at the root (run it as a module)")
        elif shell_script and not (REPO / shell_script).is_file():
            wrong.append(f"bash {shell_script}: no such file")
    return len(commands), wrong


def test_a_command_of_an_old_spelling_is_reported(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "`python3 distill.py --resume`, `python3 -m distillation.run.plots RUN`, `bash bench/gpu.sh`\n"
        "```\npython3 bench/throughput.py --quick\npython3 -m plots RUN\nbash bench/missing.sh\n```\n",
        encoding="utf-8",
    )
    assert wrong_commands(page) == (
        6,
        [
            "python3 bench/throughput.py: not a script at the root (run it as a module)",
            "python3 -m plots: no such module",
            "bash bench/missing.sh: no such file",
        ],
    )


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_every_command_a_page_writes_names_a_module_or_script_that_exists(page):
    count, wrong = wrong_commands(page)
    assert not wrong, f"{page.name}: {wrong}"
    if page.name == "README.md":
        assert count >= 5  # the pattern still finds the README's commands


def test_the_configuration_pages_key_table_is_the_schemas():
    """docs/configuration.md's table of keys, types, ranges and defaults is the one the schema writes: a key added,
    renamed or given another default in distillation/settings/schema.py fails here until the page is regenerated."""
    from distillation.settings import schema

    page = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    documented = page.split("<!-- keys: generated -->\n", 1)[1].split("\n<!-- keys: end -->", 1)[0]
    assert documented == schema.key_table()
    assert "| `training_parameters.learning_rate` | number > 0.0 | `0.001` |" in documented  # the table's real rows
