"""The Python client example of README.md runs against a real server."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.server.serving import inventory_request, running_server


def test_readme_client_example_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    code = next((b for b in blocks if "apportion.client" in b), None)
    assert code is not None, "README.md lost its client example"
    with running_server(tmp_path) as srv:
        srv.stub().UpsertNodes(inventory_request())
        code = code.replace('"127.0.0.1:50051"', f'"{srv.address}"')
        exec(compile(code, "README.md", "exec"), {})
        out = capsys.readouterr().out
        assert re.fullmatch(r"bert runs on \[\('n[12]', 2\)\]\n", out), out
