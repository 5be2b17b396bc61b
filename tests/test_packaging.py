"""The distribution lists every package of the source tree (a missing one only fails once installed)."""
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]


def test_every_source_folder_is_a_listed_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    folders = {"rdc_studio." + name: Path(path) for name, path in
               ((k.removeprefix("rdc_studio."), v) for k, v in config["package-dir"].items())}
    expected = set()
    for package, folder in folders.items():
        for source in (ROOT / folder).rglob("*.py"):
            parts = source.parent.relative_to(ROOT / folder).parts
            expected.add(".".join((package, *parts)))
    assert expected, "no source folders found"
    assert expected <= listed, f"not in pyproject's packages: {sorted(expected - listed)}"
