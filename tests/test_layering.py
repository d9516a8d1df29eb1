"""The layering that docs/architecture.md promises, read from the source: reference.py (the ground truth) imports
nothing of the package, and no production module imports it (the torch backend reaches it only through
dispatch.reference; the package __init__ re-exports it for users); and neither installed package imports anything
of tools/, the developer tools beside them that are not installed."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "action_kernels"


def _imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_reference_imports_nothing_of_the_package():
    modules = _imported_modules(PACKAGE / "reference.py")
    assert not [m for m in modules if m.startswith(("action_kernels", "action."))], modules


def test_no_production_module_imports_the_reference():
    offenders = [str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                 if path.name != "reference.py" and path != PACKAGE / "__init__.py"
                 and "action_kernels.reference" in _imported_modules(path)]
    assert not offenders, f"production modules importing the reference: {offenders}"


def test_installed_packages_import_nothing_from_tools():
    offenders = {}
    for package in ("action_kernels", "action"):
        for path in (ROOT / package).rglob("*.py"):
            bad = sorted(m for m in _imported_modules(path) if m == "tools" or m.startswith("tools."))
            if bad:
                offenders[str(path.relative_to(ROOT))] = bad
    assert not offenders, f"installed modules importing the developer tools (not installed): {offenders}"


def test_no_test_module_imports_another():
    """What test files share lives in tests/helpers.py (or conftest.py): a test module imported by another would run
    its tests' module-level code twice and tie the two files' edits together."""
    offenders = {}
    for path in (ROOT / "tests").glob("*.py"):
        bad = sorted(m for m in _imported_modules(path) if m.split(".")[0].startswith("test_"))
        if bad:
            offenders[path.name] = bad
    assert not offenders, f"test modules importing other test modules (move the shared code to helpers.py): {offenders}"
