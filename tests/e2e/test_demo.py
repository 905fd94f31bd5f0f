"""End to end: ``python -m server.demo`` (``make demo``) runs the whole service — a server, two
workers, a real ``train-lm`` gang across both and a ``serve-lm`` service — and exits 0, CPU only."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.server.serving import ROOT


def test_the_demo_trains_across_two_workers_serves_answers_and_cleans_up() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "proto")]))
    args = [sys.executable, "-m", "server.demo", "--steps", "30", "--max-tokens", "8", "--timeout", "90"]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert re.search(r"demo-train runs as one gang on demo-w1 \(2 GPUs\), demo-w2 \(2 GPUs\)", out), out
    assert "demo-train SUCCEEDED: done: step 30/30" in out, out
    answers = re.findall(r"^   '.*' -> '.+'  \(demo-chat/\d, 8 tokens\)$", out, re.MULTILINE)
    assert len(answers) == 3, out
    assert "== done in" in out
    tmp = re.search(r"state in (\S+)/state\.db", out)
    assert tmp is not None and not os.path.exists(tmp.group(1)), "the temporary directory is removed"
