import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_examples_run_as_written(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) >= 2
    script = tmp_path / "example.py"
    script.write_text("\n".join(blocks))
    env = {**os.environ, "CSC_CACHE_DIR": str(tmp_path / "cache")}  # the backend example exports its graphs there
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "my-model" / "model.safetensors").is_file()
