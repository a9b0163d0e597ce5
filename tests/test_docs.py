"""The README and the docs/ pages: snippets run as written and assert what they claim; configs,
predict rows and commands parse; links between pages resolve; the README stays a short entry point."""

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from navit.cli import build_parser
from navit.train_config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]  # top level only: docs/experiments/ holds run reports
TEXTS = {page: page.read_text() for page in PAGES}
# Written by the coordinator; until it exists a link to it is the one allowed to dangle.
def blocks(lang: str, page: Path | None = None) -> list[tuple[Path, str]]:
    pages = [page] if page else PAGES
    return [(p, code) for p in pages for code in re.findall(rf"```{lang}\n(.*?)```", TEXTS[p], flags=re.S)]


SNIPPETS = blocks("python")


def _id(page: Path, i: int) -> str:
    return f"{page.relative_to(ROOT)}:{i}"


def test_the_pages_exist_and_open_with_a_summary():
    names = {p.name for p in PAGES}
    expected = {"python-api.md", "cli.md", "data.md", "video.md", "segmentation.md", "pretrained.md",
                "experiments.md", "performance.md"}  # fmt: skip
    assert expected <= names, f"missing docs pages: {sorted(expected - names)}"
    for page in PAGES:
        lines = TEXTS[page].splitlines()
        assert lines[0].startswith("# "), f"{page.name} does not start with a title"
        first = next(line for line in lines[1:] if line.strip())
        assert not first.startswith(("#", "```", "|", "-")), f"{page.name} does not open with a summary paragraph"


def test_readme_is_a_short_entry_point_that_links_every_page():
    assert len(TEXTS[README].splitlines()) <= 250
    links = set(re.findall(r"\]\((docs/[^)#]+\.md)", TEXTS[README]))
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in links, f"README does not link docs/{page.name}"
    assert "docs/design.md" in links


def test_quick_start_is_two_commands_and_ci_runs_the_second():
    quick = TEXTS[README].split("## Quick start", 1)[1]
    block = re.findall(r"```bash\n(.*?)```", quick, flags=re.S)[0]
    commands = [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(commands) == 2
    assert commands[0].endswith("pip install -e . && navit train")
    assert commands[1].endswith("pip install -e '.[dev]' && python -m pytest -q")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install --quiet -e '.[dev]'" in ci and "pytest -q" in ci


def test_snippets_assert_their_claims():
    assert len(SNIPPETS) >= 12
    assert len(blocks("python", README)) >= 1
    for page, code in SNIPPETS:
        assert re.search(r"^assert ", code, flags=re.M), f"a snippet in {page.name} asserts nothing:\n{code[:200]}"


@pytest.mark.parametrize("page,code", SNIPPETS, ids=[_id(p, i) for i, (p, _) in enumerate(SNIPPETS)])
def test_snippet_runs(page, code):
    exec(compile(code, str(page), "exec"), {})


def test_yaml_configs_are_valid_configs():
    configs = blocks("yaml")
    assert configs
    for page, block in configs:
        TrainConfig.from_dict(yaml.safe_load(block))  # raises on an unknown option or a bad value
    ((_, block),) = blocks("yaml", ROOT / "docs" / "cli.md")
    cfg = TrainConfig.from_dict(yaml.safe_load(block))
    assert cfg.model.args == {"rope": True} and cfg.optim.precision == "bf16" and cfg.data.drop == "beta"


def test_predict_json_rows_have_the_promised_keys():
    rows = blocks("json")
    assert rows
    for page, block in rows:
        row = json.loads(block)
        assert set(row) == {"path", "labels", "tokens", "error"} and set(row["labels"][0]) == {"label", "score"}


def test_commands_use_existing_options():
    parser = build_parser()
    commands = [line.split("#")[0].strip() for _, block in blocks("bash") for line in block.splitlines()]
    navit = [shlex.split(c.split("-m navit ", 1)[-1].removeprefix("navit ")) for c in commands if re.search(r"(^navit |-m navit )", c)]
    assert len(navit) >= 40
    assert {argv[0] for argv in navit} == {"train", "eval", "predict", "experiment", "data", "serve"}
    for argv in navit:
        parser.parse_args(argv)  # exits (fails the test) on an unknown option or a bad choice


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", TEXTS[page] if page in TEXTS else page.read_text(), flags=re.S)
    return {_anchor(h) for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}


def test_links_between_pages_resolve():
    checked = 0
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", TEXTS[page]):
            if re.match(r"[a-z]+:", target):
                continue  # an outside address
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.exists(), f"{page.name} links to {target}, which does not exist"
            if anchor:
                assert anchor in _anchors(dest), f"{page.name} links to {target}: no such heading"
            checked += 1
    assert checked >= 20
