"""The README's snippets run as written and assert what they claim; its configs and commands parse."""

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from navit.cli import build_parser
from navit.train_config import TrainConfig

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)


def test_readme_has_snippets_that_assert_their_claims():
    assert len(SNIPPETS) >= 5
    for code in SNIPPETS:
        assert re.search(r"^assert ", code, flags=re.M), f"a snippet asserts nothing:\n{code[:200]}"


@pytest.mark.parametrize("code", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_readme_snippet_runs(code):
    exec(compile(code, str(README), "exec"), {})


def test_readme_yaml_config_is_a_valid_config():
    (block,) = re.findall(r"```yaml\n(.*?)```", TEXT, flags=re.S)
    cfg = TrainConfig.from_dict(yaml.safe_load(block))
    assert cfg.model.args == {"rope": True} and cfg.optim.precision == "bf16" and cfg.data.drop == "beta"


def test_readme_predict_json_has_the_promised_keys():
    (block,) = re.findall(r"```json\n(.*?)```", TEXT, flags=re.S)
    row = json.loads(block)
    assert set(row) == {"path", "labels", "tokens", "error"} and set(row["labels"][0]) == {"label", "score"}


def test_readme_commands_use_existing_options():
    parser = build_parser()
    commands = [line.split("#")[0].strip() for block in re.findall(r"```bash\n(.*?)```", TEXT, flags=re.S)
                for line in block.splitlines()]  # fmt: skip
    navit = [shlex.split(c.split("-m navit ", 1)[-1].removeprefix("navit ")) for c in commands if re.search(r"(^navit |-m navit )", c)]
    assert len(navit) >= 10
    for argv in navit:
        parser.parse_args(argv)  # exits (fails the test) on an unknown option or a bad choice
