"""The `poolsvc` command itself: help, version, and start-up errors a user meets first."""

from __future__ import annotations

import importlib.metadata
import socket
import subprocess
import sys

from conftest import ROOT


def poolsvc(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "poolsvc", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_help_describes_the_command():
    done = poolsvc("--help")
    assert done.returncode == 0
    assert "Serve pooling models over gRPC" in done.stdout
    assert "serve" in done.stdout and "--version" in done.stdout
    assert "ServerConfig" not in done.stdout  # no internal docstring


def test_version_is_the_installed_distribution_version():
    done = poolsvc("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"poolsvc {importlib.metadata.version('poolsvc')}"


def test_a_taken_port_is_one_clear_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = poolsvc("serve", "--port", str(port))
        metrics = poolsvc("serve", "--port", "0", "--metrics-port", str(port))
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"port {port} on 127.0.0.1 is already in use" in lines[0] and "--port" in lines[0]
    assert "GRPC_VERBOSITY" not in done.stderr
    assert metrics.returncode == 1
    (line,) = metrics.stderr.strip().splitlines()
    assert f"cannot serve metrics on 127.0.0.1:{port}" in line and "--metrics-port" in line
