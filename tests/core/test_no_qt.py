"""core/ must stay importable without Qt: no module under core/ imports a Qt binding."""
import ast
import pathlib
import subprocess
import sys

import rdc_studio.core

# the installed package's own folder (a wheel install checks what was installed)
CORE = pathlib.Path(rdc_studio.core.__file__).resolve().parent
QT_MODULES = {"PySide6", "PySide2", "PyQt5", "PyQt6", "pyqtgraph", "qtpy", "superqt", "shiboken6"}


def _core_sources() -> list[pathlib.Path]:
    sources = sorted(CORE.rglob("*.py"))
    assert len(sources) >= 8, f"found only {len(sources)} modules under {CORE}: nothing to check"
    return sources


def test_no_qt_imports_in_core_source():
    offenders = []
    for path in _core_sources():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in QT_MODULES]
    assert not offenders, offenders


def test_importing_core_loads_no_qt():
    mods = [".".join(p.relative_to(CORE).with_suffix("").parts) for p in _core_sources()]
    mods = [m.removesuffix(".__init__") for m in mods if m not in ("__init__", "__main__")]  # __main__ runs the CLI
    code = ("import sys\n" + "".join(f"import rdc_studio.core.{m}\n" for m in mods)
            + f"bad = [m for m in sys.modules if m.split('.')[0] in {sorted(QT_MODULES)!r}]\n"
            + "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib.Path.home())


def test_allocator_tuning_is_idempotent_and_reported():
    from rdc_studio.core.runtime import tune_allocator

    first = tune_allocator()
    assert isinstance(first, bool) and tune_allocator() is first
    if sys.platform.startswith("linux") and "glibc" in " ".join(__import__("platform").libc_ver()):
        assert first is True
