"""The README's Python API example runs as it stands (so it never goes stale)."""
import re
from pathlib import Path

import pytest

from rdc_studio.core.data import mnist_available

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    """The fenced Python block of the README's "Python API" section."""
    section = README.read_text().split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Python API section has one example"
    return blocks[0]


@pytest.mark.skipif(not mnist_available(), reason="needs ../shared/data MNIST")
def test_the_readme_python_example_runs(capsys):
    exec(compile(readme_example(), "README.md (Python API)", "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    predicted = re.search(r"predicted \[(\d), (\d)\] true \[(\d), (\d)\]", out)
    assert predicted, out
    assert predicted.group(3, 4) == ("7", "2")  # the first two test digits
    assert re.search(r"fooled \[(True|False), (True|False)\]", out), out
