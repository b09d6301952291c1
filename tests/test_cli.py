"""The `poolsvc` command itself: help, version, and start-up errors a user meets first."""

from __future__ import annotations

import importlib.metadata
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

