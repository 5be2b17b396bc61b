"""core/ must stay importable without Qt: no module under core/ imports a Qt binding."""
import ast
import pathlib
import subprocess
import sys

CORE = pathlib.Path(__file__).resolve().parents[2] / "core"
QT_MODULES = {"PySide6", "PySide2", "PyQt5", "PyQt6", "pyqtgraph", "qtpy", "superqt", "shiboken6"}


def test_no_qt_imports_in_core_source():
    offenders = []
    for path in CORE.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in QT_MODULES]
    assert not offenders, offenders
    assert len(list(CORE.rglob("*.py"))) >= 8


def test_importing_core_loads_no_qt():
    mods = [p.stem for p in CORE.glob("*.py") if p.stem != "__init__"]
    code = ("import sys\n" + "".join(f"import core.{m}\n" for m in mods)
            + f"bad = [m for m in sys.modules if m.split('.')[0] in {sorted(QT_MODULES)!r}]\n"
            + "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=CORE.parent)


def test_allocator_tuning_is_idempotent_and_reported():
    from core.runtime import tune_allocator

    first = tune_allocator()
    assert isinstance(first, bool) and tune_allocator() is first
    if sys.platform.startswith("linux") and "glibc" in " ".join(__import__("platform").libc_ver()):
        assert first is True
