"""The README's grpcurl and buf curl commands, run as written against a real server."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## grpcurl and buf curl"):]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def transcript(after: str) -> list[tuple[str, list[str]]]:
    """(command, the lines it prints) of the README's first ``` block after `after`."""
    block = (ROOT / "README.md").read_text().split(after)[1].split("```\n")[1].split("```")[0]
    steps: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            steps[-1][1].append(line)
    return steps


def run(command: str, address: str) -> str:
    argv = shlex.split(command.replace("localhost:50051", address))
    argv[0] = str(BIN / argv[0])
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, env={**os.environ})
    assert result.returncode == 0, f"{command}\n{result.stderr}"
    return result.stdout


def test_every_readme_command_works(server):
    commands = readme_commands()
    assert len(commands) == 9
    out = [run(c, server.address) for c in commands]
    assert "abstream.v1.AnalyticsService" in out[0] and "grpc.health.v1.Health" in out[0]
    assert "rpc Summary ( .abstream.v1.SummaryRequest )" in out[1]
    assert json.loads(out[2])["status"] == "SERVING"
    assert json.loads(out[3])["accepted"] == 1
    summary = json.loads(out[4])
    assert summary["rows"][0]["variant"] == "variant_a" and summary["rows"][0]["metrics"]["total_revenue"] == 84.55
    assert json.loads(out[5])["rows"][0]["metrics"]["users"] == "1"
    assert "abstream.v1.AnalyticsService/Summary" in out[6]
    assert json.loads(out[7])["accepted"] == 1
    assert json.loads(out[8])["status"] == "SERVING"


def test_buf_generates_go_and_java_stubs(tmp_path):
    """`buf generate` with buf.gen.yaml, where the local plugins are installed (Debian packages
    protoc-gen-go, protoc-gen-go-grpc, protobuf-compiler, protobuf-compiler-grpc-java-plugin)."""
    import shutil

    import pytest

    missing = [p for p in ("protoc-gen-go", "protoc-gen-go-grpc", "grpc_java_plugin", "protoc") if not shutil.which(p)]
    if missing:
        pytest.skip(f"plugins not installed: {', '.join(missing)}")
    result = subprocess.run([str(BIN / "buf"), "generate", "--output", str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "gen/go/abstream/v1/analytics_grpc.pb.go").is_file()
    assert (tmp_path / "gen/java/dev/abstream/v1/AnalyticsServiceGrpc.java").is_file()
    assert "package abstreamv1" in (tmp_path / "gen/go/abstream/v1/analytics.pb.go").read_text()


def test_the_readme_transcript_is_what_the_command_prints(server):
    """The README's `$ abstream ...` transcript, run in order against a new server, prints
    exactly what the README shows."""
    steps = transcript("This transcript, on a server")
    assert len(steps) == 4
    for command, expected in steps:
        argv = shlex.split(command)
        argv[0] = str(BIN / argv[0])
        result = subprocess.run([*argv, "--addr", server.address], capture_output=True, text=True, timeout=60,
                                cwd=ROOT)
        assert result.returncode == 0, (command, result.stderr)
        assert result.stdout.splitlines() == expected, command


def test_the_tutorials_commands_in_the_readme_print_what_it_shows(tmp_path):
    """The README's "Coming from the tutorial" transcript: its curl commands, run by a shell
    against `abstream serve` as `make run` starts it (its HTTP address the default, 127.0.0.1:7181,
    here an ephemeral port), print exactly what the README shows."""
    import shutil

    import pytest
    from abstream.core.settings import Settings

    from tests.process import Server

    if shutil.which("curl") is None:
        pytest.skip("curl is installed by make test (apt-get)")
    import argparse

    parser = argparse.ArgumentParser()
    Settings.add_arguments(parser)
    assert Settings.from_args(parser.parse_args([]), {}).http_addr == "127.0.0.1:7181"
    steps = transcript("## Coming from the tutorial")
    assert len(steps) == 3 and all(command.startswith("curl ") for command, _ in steps)
    server = Server(tmp_path / "data").start()
    try:
        for command, expected in steps:
            assert "127.0.0.1:7181" in command
            result = subprocess.run(["bash", "-c", command.replace("127.0.0.1:7181", server.http_address)],
                                    capture_output=True, text=True, timeout=60,
                                    env={**os.environ, "TB_TOKEN": "any-token-on-a-loopback-server-without-tokens"})
            assert result.returncode == 0, (command, result.stderr)
            assert result.stdout.splitlines() == expected, command
    finally:
        server.kill()
