"""The README's Python examples (```python blocks; ```py blocks need a running server and are not run).

They run as written, from a folder outside the repository that has packages of its own named ``models`` and
``export``, in tests/test_packaging.py; here they are only read and compiled.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_python_examples() -> str:
    """Every ```python block of README.md, in order, as one script."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) >= 2
    return "\n".join(blocks)


def test_readme_python_examples_compile():
    compile(readme_python_examples(), "README.md", "exec")
