"""The shape of the project: the module table of docs/architecture.md is the import order (every import points down,
function-local and `importlib` imports included), a name is imported from the module that defines it (re-exports only
for the public API), and every module says its one job first and stays the size of one job."""

import ast
import glob
import os
import re
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Modules are cut along jobs, not along a line count: a module past SOFT_LINES is said (is it still one job?), one past
# HARD_LINES fails.
SOFT_LINES, HARD_LINES = 450, 600
# The names the public API (README, shared contract) reaches through a module that is not their home.
PUBLIC_REEXPORTS = {
    ("persona_model", "SPECIAL_TOKENS"),
    ("persona_model", "add_special_tokens"),
    ("persona_chat", "PersonaBot"),
    ("persona_chat", "load_for_chat"),
    ("persona_chat", "generate_replies"),
    ("persona_chat", "generate_ranked"),
    ("persona_eval", "f1_score"),
    ("persona_eval", "evaluate_convai2"),
    ("persona_eval", "CONVAI2_METRIC_PATH"),
}


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
        elif (  # importlib.import_module("persona_x") / __import__("persona_x")
            isinstance(node, ast.Call)
            and (getattr(node.func, "attr", None) == "import_module" or getattr(node.func, "id", None) == "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value.split(".")[0])
    return found & project


def defined_names(name: str) -> set[str]:
    """The names module `name` defines at its top level (functions, classes, assignments)."""
    with open(os.path.join(ROOT, f"{name}.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


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


def test_the_layering_check_sees_importlib_edges(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text('import importlib\nimportlib.import_module("persona_cli")\n__import__("persona_data")\n')
    assert project_imports(str(path), {"persona_cli", "persona_data", "persona_model"}) == {
        "persona_cli",
        "persona_data",
    }


def test_names_are_imported_from_their_home():
    """`from persona_x import name` names a module that defines `name`: a re-export is allowed only for the public
    API (PUBLIC_REEXPORTS), so a rule never gets a second home that callers reach it through."""
    order = table_order()
    homes = {name: defined_names(name) for name in order}
    paths = [os.path.join(ROOT, f"{name}.py") for name in order]
    paths += sorted(glob.glob(os.path.join(ROOT, "tests", "*.py")) + glob.glob(os.path.join(ROOT, "bench", "*.py")))
    paths += sorted(glob.glob(os.path.join(ROOT, "metrics", "*", "*.py")))
    through = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in homes:
                for alias in node.names:
                    if alias.name not in homes[node.module] and (node.module, alias.name) not in PUBLIC_REEXPORTS:
                        through.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}: {node.module}.{alias.name}")
    assert through == []


def test_the_public_reexports_resolve():
    import importlib

    for module, name in sorted(PUBLIC_REEXPORTS):
        assert getattr(importlib.import_module(module), name) is not None, (module, name)


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
    lines = len(text.splitlines())
    assert lines <= HARD_LINES
    if lines > SOFT_LINES:
        warnings.warn(f"{os.path.basename(path)} has {lines} lines: is it still one job?", stacklevel=1)
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
