"""Repository invariants: stubs match the protos, buf lint, ruff, the README's commands."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert found, f"{name} is a test dependency; install with pip install -e '.[test]'"
    return found


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_generated_stubs_match_the_protos():
    """Both copies: the server's poolsvc/gen/ and the Python client's poolsvc_client/gen/."""
    done = run(sys.executable, "scripts/gen_protos.py", "--check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "poolsvc/gen/ matches" in done.stdout
    assert "clients/python/poolsvc_client/gen/ matches" in done.stdout


def test_buf_lint():
    done = run(tool("buf"), "lint")
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff():
    done = run(tool("ruff"), "check", "poolsvc", "clients", "tests", "scripts", "bench", "kernels",
               "examples")
    assert done.returncode == 0, done.stdout + done.stderr


def test_service_layer_never_imports_torch():
    for path in (ROOT / "poolsvc" / "service").glob("*.py"):
        assert not re.search(r"^\s*(import|from) torch", path.read_text(), re.M), path
    for path in (ROOT / "poolsvc" / "engine").rglob("*.py"):
        assert not re.search(r"^\s*(import|from) grpc", path.read_text(), re.M), path
    done = run(sys.executable, "-c", "import sys, poolsvc_client, poolsvc.gen.v1.embed_pb2; "
               "assert 'torch' not in sys.modules")
    assert done.returncode == 0, done.stderr


def test_readme_has_the_two_commands_that_ci_runs():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"<!-- (serve|test) command -->\n```(?:sh|bash)\n(.+?)\n```", readme)
    assert [kind for kind, _ in commands] == ["serve", "test"]
    test_command = commands[1][1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "test command" in ci and "README.md" in ci
    assert "poolsvc serve" in commands[0][1] and "pytest" in test_command


def test_buf_breaking_against_the_previous_commit():
    """The public contract only grows: no field renumbered, renamed or removed."""
    previous = run("git", "rev-parse", "--verify", "--quiet", "HEAD~1")
    assert previous.returncode == 0, "needs the git history (a clone, not an archive)"
    done = run(tool("buf"), "breaking", "--against", ".git#ref=HEAD~1")
    assert done.returncode == 0, done.stdout + done.stderr


def test_kubernetes_manifests():
    import yaml

    from poolsvc.cli import build_parser, config_from_args
    from poolsvc.service.server import EXIT_MARGIN
    docs = {p.name: yaml.safe_load(p.read_text()) for p in (ROOT / "deploy").glob("*.yaml")}
    assert docs["service.yaml"]["spec"]["clusterIP"] == "None"  # headless: client-side balancing
    for name in ("deployment-cpu.yaml", "deployment-gpu.yaml"):
        (container,) = docs[name]["spec"]["template"]["spec"]["containers"]
        config = config_from_args(build_parser().parse_args(container["args"]))  # valid flags
        assert container["readinessProbe"]["grpc"]["port"] == config.port
        assert container["startupProbe"]["grpc"]["port"] == config.port
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"grpc": config.port, "metrics": config.metrics_port}
        grace = docs[name]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
        assert grace >= pause + config.grace_period + EXIT_MARGIN  # the drain's bound fits
        assert container["resources"]["requests"]["cpu"]
    gpu = docs["deployment-gpu.yaml"]["spec"]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_benchmark_data_is_in_the_repository():
    """bench/ runs on a fresh clone: its corpus is committed, nothing points outside the repo."""
    for name, count in (("queries", 5276), ("passages", 323)):
        lines = (ROOT / "bench" / "data" / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) == count, name
    tracked = run("git", "ls-files").stdout.split()
    outside = [p for p in tracked if (ROOT / p).suffix in {".py", ".md", ".sh", ".js", ".yaml"}
               and re.search(r"\.\./shared|/work/\w*shared", (ROOT / p).read_text())]
    assert outside == []


def test_runtime_imports_are_declared_dependencies():
    """Every third-party module the server package imports comes from a distribution that
    pyproject.toml declares (runtime, or the optional extra that uses it)."""
    import ast
    import importlib.metadata

    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0].lower().replace("_", "-")
                for d in [*project["dependencies"],
                          *(d for extra in ("gpu", "tracing", "parquet", "ray", "http")
                            for d in project["optional-dependencies"][extra])]}
    modules = set()
    for path in [*(ROOT / "poolsvc").rglob("*.py"), *(ROOT / "kernels").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.split(".")[0])
    owners = importlib.metadata.packages_distributions()
    undeclared = {}
    for module in sorted(modules - set(sys.stdlib_module_names) - {"poolsvc", "poolsvc_kernels"}):
        dists = {d.lower().replace("_", "-") for d in owners.get(module, [])}
        if not dists & declared:
            undeclared[module] = sorted(dists)
    assert undeclared == {}, "imported but not declared in pyproject.toml"


def test_no_test_listens_on_a_fixed_port():
    """A server started by a test or the benchmark always gets `--port 0` (or a port a test has
    just found free), never the default 50051, which the README's own server may hold."""
    import ast

    def constant(node):
        return node.value if isinstance(node, ast.Constant) else None

    offenders = []
    for path in [*(ROOT / "tests").glob("*.py"), *(ROOT / "bench").glob("*.py")]:
        tree = ast.parse(path.read_text())
        parsing = {id(arg) for node in ast.walk(tree) if isinstance(node, ast.Call)
                   and isinstance(node.func, ast.Attribute) and node.func.attr == "parse_args"
                   for arg in node.args}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "PoolServer":
                config = node.args[0]
                ports = [k.value for k in getattr(config, "keywords", ()) if k.arg == "port"]
                if not ports or constant(ports[0]) not in (0, None):
                    offenders.append(f"{path.name}:{node.lineno}")
            elements = (node.elts if isinstance(node, (ast.List, ast.Tuple)) else
                        node.args if isinstance(node, ast.Call) else [])
            values = [constant(e) for e in elements]
            command = isinstance(node, ast.Call) or any(  # not, say, a list of README commands
                isinstance(e, ast.Starred) or str(constant(e)).startswith("--") for e in elements)
            if "serve" in values and command and id(node) not in parsing:
                at = values.index("--port") if "--port" in values else None
                if at is None or at + 1 >= len(values) or values[at + 1] not in ("0", None):
                    offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []
