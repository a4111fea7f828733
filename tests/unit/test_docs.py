"""The documents are part of the contract: they must name what the code does."""

from __future__ import annotations

import re

from hub.cli import build_parser
from hub.config import OPTIONS
from hub.protocol import CLOSE_CODES, ERROR_CODES
from tests.helpers import ROOT

PROTOCOL = (ROOT / "docs" / "protocol.md").read_text()
README = (ROOT / "README.md").read_text()


def test_every_cli_option_and_variable_is_documented():
    for opt in OPTIONS:
        assert f"`{opt.flag}" in PROTOCOL, opt.flag
        assert f"`{opt.env}`" in PROTOCOL, opt.env


def test_documented_flags_exist():
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    known = {s for action in serve._actions for s in action.option_strings}
    table = PROTOCOL.split("## 7. CLI")[1].split("## 8.")[0]
    for flag in re.findall(r"^\| `(--[a-z-]+)", table, re.M):
        assert flag in known, flag


def test_every_error_and_close_code_is_documented():
    for code in ERROR_CODES:
        assert f"| `{code}` |" in PROTOCOL, code
    for code in CLOSE_CODES:
        assert f"| {code} |" in PROTOCOL, code


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = re.findall(r"^Pass the tests.*?```sh\n(.*?)\n```", README, re.M | re.S)
    assert blocks, "README gives no test command"
    command = blocks[0].strip()
    assert command == "bash scripts/test.sh"
    assert re.search(rf"^{re.escape(command)}$", ci, re.M), "CI does not run the README's command"


def test_test_script_makes_a_fresh_venv_and_installs_the_test_extra():
    script = (ROOT / "scripts" / "test.sh").read_text()
    assert "python3 -m venv --clear" in script
    assert "pip install -q -e '.[test]'" in script
    assert "python -m pytest" in script


def test_readme_names_the_distribution_pyproject_builds():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] != "hub"  # taken on PyPI by an unrelated package
    assert f"**`{project['name']}`**" in README
    assert project["scripts"]["hub"] == "hub.cli:main"


def test_architecture_tree_matches_the_package():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    tree = doc.split("## The tree")[1].split("```")[1]
    named, folder = set(), ""
    for line in tree.splitlines():
        m = re.match(r"( *)(\S+)", line)
        if not m or m.group(2) == "hub/":
            continue
        name = m.group(2)
        if name.endswith("/"):
            folder = name
        elif len(m.group(1)) == 2:
            folder = ""
            named.add(name)
        else:
            named.add(folder + name)
    actual = {str(p.relative_to(ROOT / "hub")) for p in (ROOT / "hub").rglob("*.py")}
    assert named == actual
