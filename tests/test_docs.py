"""The docs' promises that can be checked mechanically: the README's commands are CI's, the options
page is generated from the code, links between pages resolve, the paths and commands the pages
name exist, the boundaries architecture.md states hold, and the API examples run."""

import ast
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from hpcnn.config import Config
from hpcnn.options_doc import COMMAND, options_markdown

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OPTIONS = (ROOT / "docs" / "options.md").read_text()


def test_readme_has_the_two_commands_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = re.search(r'^TEST_COMMAND="(.+)"$', ci, flags=re.M).group(1)
    assert test_command in README.splitlines()
    assert "pip install '.[mpich]' && mpirun -n 8 python -m hpcnn.train" in README.splitlines()


def test_readme_is_a_front_page_not_a_manual():
    assert len(README.splitlines()) <= 200


def test_the_options_page_is_what_the_generator_makes_of_config():
    assert options_markdown() == OPTIONS, f"docs/options.md is stale: regenerate it with {COMMAND}"


def test_options_page_lists_every_option_with_its_real_default():
    defaults = Config()
    for f in fields(Config):
        value = getattr(defaults, f.name)
        shown = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        shown = shown.lower() if isinstance(value, bool) else shown
        shown = shown or '""'  # an empty value, as it is typed on the command line
        row = f"| `--{f.name.replace('_', '-')}` | `{shown}` |"
        assert row in OPTIONS, f"docs/options.md lacks or misstates {row}"
        for choice in f.metadata["choices"] or []:
            shown_line = OPTIONS.split(row)[1].splitlines()[0]
            assert str(choice) in shown_line, f"{f.name}: choice {choice} not shown"
    documented = re.findall(r"^\| `--([a-z0-9-]+)`", OPTIONS, flags=re.M)
    assert sorted(documented) == sorted(f.name.replace("_", "-") for f in fields(Config))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_between_the_pages_resolves(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    for link in links:
        if re.match(r"[a-z]+:", link):  # https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.is_file(), f"{page.name}: link {link} names no file"
        if anchor:
            assert target.suffix == ".md" and anchor in _anchors(target), (
                f"{page.name}: no #{anchor} in {path}"
            )


def test_every_page_in_docs_is_linked_from_the_readme():
    linked = set(re.findall(r"\]\(docs/([\w.-]+\.md)\)", README))
    assert linked == {p.name for p in (ROOT / "docs").glob("*.md")}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_files_and_commands_a_page_names_exist(page):
    text = page.read_text()
    for path in set(re.findall(r"(?<![\w/.-])((?:hpcnn|tests|jobs|docs|\.ci)/[\w./<>*-]*[\w/>])", text)):
        if "<" in path or "*" in path:  # a pattern (tests/test_<name>.py, jobs/*.sbatch), not a file
            continue
        assert (ROOT / path).exists(), f"{page.name} names {path}, which does not exist"
    for module in set(re.findall(r"python -m (hpcnn(?:\.\w+)*)", text)):
        assert importlib.util.find_spec(module) is not None, f"{page.name}: no module {module}"


def _imports(path: Path) -> set:
    """The modules ``path`` imports (anywhere in it), as dotted names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def _modules() -> dict:
    """Every module of the package by dotted name -> its file."""
    out = {}
    for path in (ROOT / "hpcnn").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def test_the_numerical_core_is_numpy_only():
    for name, path in _modules().items():
        if not name.startswith("hpcnn.core"):
            continue
        imported = _imports(path)
        # hpcnn.errors (UserError and the exit codes, importing nothing) is the one module outside core
        outside = {
            m for m in imported if m.startswith("hpcnn") and not m.startswith(("hpcnn.core", "hpcnn.errors"))
        }
        foreign = {m for m in imported if m.split(".")[0] in ("mpi4py", "h5py", "argparse")}
        assert not outside and not foreign, f"{name} imports {sorted(outside | foreign)}"
        calls = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)]
        assert not any(isinstance(c.func, ast.Name) and c.func.id == "print" for c in calls), f"{name} prints"


def test_only_the_commands_and_config_parse_argv():
    for name, path in _modules().items():
        if name.count(".") >= 2:  # hpcnn.<package>.<module>: library code
            assert "argparse" not in _imports(path), f"{name} imports argparse"


def test_the_import_graph_is_acyclic():
    modules = _modules()
    graph = {
        name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()
    }
    done, path = set(), []

    def visit(name):
        if name in path:
            cycle = path[path.index(name) :] + [name]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        path.append(name)
        for dep in sorted(graph[name]):
            visit(dep)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)


def test_the_readme_api_example_learns_xor(tmp_path):
    (script,) = _python_blocks(README)
    assert script in _python_blocks((ROOT / "docs" / "api.md").read_text())  # one example, two places
    (tmp_path / "xor.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "xor.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    out = out.stdout
    predictions = [float(v) for v in re.findall(r"\d\.\d+|\d+\.?", out.strip().splitlines()[-1])]
    assert [round(p) for p in predictions] == [0, 1, 1, 0], out


def test_the_api_pages_layer_passes_its_gradient_check():
    blocks = [b for b in _python_blocks((ROOT / "docs" / "api.md").read_text()) if "check_gradients(" in b]
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), {"__name__": "docs_api_example"})
