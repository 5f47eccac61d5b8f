"""The README's promises that can be checked mechanically."""

import re
from dataclasses import fields
from pathlib import Path

from hpcnn.config import Config

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_options_table_lists_every_option_with_its_real_default():
    defaults = Config()
    for f in fields(Config):
        value = getattr(defaults, f.name)
        shown = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        shown = shown.lower() if isinstance(value, bool) else shown
        row = f"| `--{f.name.replace('_', '-')}` | `{shown}` |"
        assert row in README, f"README options table lacks or misstates {row}"
    documented = set(re.findall(r"^\| `--([a-z0-9-]+)`", README, flags=re.M))
    assert documented == {f.name.replace("_", "-") for f in fields(Config)}


def test_readme_has_the_two_commands_ci_runs():
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    test_command = re.search(r'^TEST_COMMAND="(.+)"$', ci, flags=re.M).group(1)
    assert test_command in README.splitlines()
    assert "pip install '.[mpich]' && mpirun -n 8 python -m hpcnn.train" in README.splitlines()
