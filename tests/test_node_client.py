"""The Node client (@grpc/grpc-js, the same proto) against the real server: `node --test`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

NODE_DIR = Path(__file__).resolve().parent.parent / "clients" / "node"


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_node_client(server):
    assert (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir(), "run `make test`: it installs the Node client"
    result = subprocess.run(["node", "--test", "test/"], cwd=NODE_DIR, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "ABSTREAM_ADDR": server.address})
    assert result.returncode == 0, result.stdout + result.stderr
    counts = dict(re.findall(r"^# (tests|pass|fail) (\d+)$", result.stdout, re.MULTILINE))
    declared = sum(len(re.findall(r"^test\(", p.read_text(), re.MULTILINE)) for p in (NODE_DIR / "test").glob("*.js"))
    assert declared > 0 and counts == {"tests": str(declared), "pass": str(declared), "fail": "0"}, result.stdout
