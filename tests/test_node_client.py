"""The Node client (@grpc/grpc-js, the same proto) against the real server: `node --test`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from abstream.core.auth import hash_token
from abstream.core.settings import Settings

from tests.conftest import ServerThread

NODE_DIR = Path(__file__).resolve().parent.parent / "clients" / "node"


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_node_client(tmp_path):
    """On a server with a tokens file: every call of the tests carries the token."""
    assert (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir(), "run `make test`: it installs the Node client"
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[[token]]\nname = "node"\nsha256 = "{hash_token("tok-node")}"\nscopes = ["ingest", "query"]\n')
    server = ServerThread(Settings(addr="127.0.0.1:0", data_dir="", tokens_file=str(tokens))).start()
    try:
        result = subprocess.run(["node", "--test", "test/"], cwd=NODE_DIR, capture_output=True, text=True, timeout=120,
                                env={**os.environ, "ABSTREAM_ADDR": server.address, "ABSTREAM_TOKEN": "tok-node"})
    finally:
        server.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    counts = dict(re.findall(r"^# (tests|pass|fail) (\d+)$", result.stdout, re.MULTILINE))
    declared = sum(len(re.findall(r"^test\(", p.read_text(), re.MULTILINE)) for p in (NODE_DIR / "test").glob("*.js"))
    assert declared > 0 and counts == {"tests": str(declared), "pass": str(declared), "fail": "0"}, result.stdout
