"""The shape of the project: the module table of docs/architecture.md is the import order (every import points down,
function-local imports included), every module says its one job first and stays the size of one job."""

import ast
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LINES = 460  # "none over ~450 lines"


def table_order() -> list[str]:
    """The modules in the order docs/architecture.md's table lists them, bottom layer first."""
    with open(os.path.join(ROOT, "docs", "architecture.md"), encoding="utf-8") as f:
        text = f.read()
    return re.findall(r"^\| [^|]+ \| `(\w+)\.py` \|", text, flags=re.MULTILINE)


def project_imports(path: str, project: set[str]) -> set[str]:
    """Every project module `path` imports anywhere in its code (top level, functions, conditionals)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & project


def test_the_table_lists_every_module_once():
    on_disk = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py")))
    order = table_order()
    assert sorted(order) == on_disk and len(set(order)) == len(order)


def test_every_import_points_down_the_table():
    order = table_order()
    rank = {name: i for i, name in enumerate(order)}
    upward = []
    for name in order:
        for imported in project_imports(os.path.join(ROOT, f"{name}.py"), set(order)):
            if rank[imported] >= rank[name]:
                upward.append(f"{name} imports {imported}")
    assert upward == []


def test_the_evaluate_module_imports_no_command_line_code():
    path = os.path.join(ROOT, "metrics", "convai2", "convai2.py")
    imported = project_imports(path, set(table_order()))
    assert imported == {"persona_metrics", "persona_nli"}  # the definitions; persona_nli loads NLI checkpoints


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "*.py"))), ids=os.path.basename)
def test_each_module_opens_with_its_job_and_is_one_job_long(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    docstring = ast.get_docstring(ast.parse(text))
    assert docstring and len(docstring.splitlines()[0]) > 20
    assert len(text.splitlines()) <= MAX_LINES
    assert "DESIGN.md" not in text and not re.search(r"(?i)\bissue\s*#?\d", text)


def test_no_test_module_imports_another():
    """Shared fixtures live in conftest.py (built once per session), shared functions in tests/helpers.py: a test
    module imported by another would rebuild its module-scoped fixtures there and run its tests' names twice."""
    tests = glob.glob(os.path.join(ROOT, "tests", "*.py"))
    test_modules = {os.path.basename(p)[:-3] for p in tests if os.path.basename(p).startswith("test_")}
    found = {os.path.basename(p): project_imports(p, test_modules) for p in tests}
    assert {name: sorted(imported) for name, imported in found.items() if imported} == {}


def test_the_readme_names_the_test_commands_ci_runs():
    """`.ci/run` runs the fast tier, then the slow one; the README shows both commands as CI calls them."""
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = [line.strip() for line in f if line.startswith("python -m pytest")]
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert ci == ['python -m pytest -q -m "not slow" --durations=25', "python -m pytest -q -m slow --durations=25"]
    shown = {line.split("  #")[0].strip() for line in readme.splitlines()}
    assert set(ci) <= shown
