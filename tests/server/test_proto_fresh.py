"""The committed generated code under proto/ is what `make proto` produces now.

Generation runs in a subprocess: grpc_tools.protoc must not be imported into a
process that loads OR-Tools (the test process may have).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_protos_are_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_module_imports_as_apportion_v1() -> None:
    from apportion.v1 import types_pb2

    assert types_pb2.DESCRIPTOR.package == "apportion.v1"
    assert {"Inventory", "WorkloadList", "Plan"} <= set(types_pb2.DESCRIPTOR.message_types_by_name)
