"""The embedding example in README.md runs and places the job on the faster type."""

from __future__ import annotations

import re
from pathlib import Path


def test_readme_embedding_example_runs(capsys):
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    code = next((b for b in blocks if "import solver" in b or "from solver" in b), None)
    assert code is not None, "README.md lost its embedding example"
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "PlanStatus.OPTIMAL" in out
    assert "j1 runs on h100-80g: n1×8" in out
