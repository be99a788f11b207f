"""The repository's own promises: layout, packaging pins, and the compose file."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_standard_library_platform_importable_from_repository_root():
    # platform/ is a source folder, not a package: from the root, `import platform` must be the stdlib's.
    out = subprocess.run(
        [sys.executable, "-c", "import platform, sys; print(platform.system()); print(platform.__file__)"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    assert out[0] in {"Linux", "Darwin", "Windows"}
    assert not out[1].startswith(str(ROOT))


def test_source_folders_are_not_packages():
    for folder in ("platform", "workers", "web"):
        assert not (ROOT / folder / "__init__.py").exists()
    for package in ("platform/trainyard", "workers/trainyard_workers", "web/trainyard_web"):
        assert (ROOT / package / "__init__.py").is_file()


def test_torch_pins_and_console_command():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"]
    assert "torch==2.14.1" in deps and "torchvision==0.29.1" in deps
    assert project["scripts"] == {"trainyard": "trainyard.cli:main"}


def test_compose_file_describes_a_real_deployment():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "mlflow", "web", "worker", "migrate"} <= set(services)
    env = compose["x-trainyard-env"]
    assert env["TRAINYARD_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert env["TRAINYARD_BROKER_URL"].startswith("redis://")
    assert "--appendonly" in services["redis"]["command"] and "--requirepass" in services["redis"]["command"]
    assert services["web"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    # MLflow has no login of its own: never published beyond the host's loopback; Redis needs a password.
    assert all(str(port).startswith("127.0.0.1:") for port in services["mlflow"].get("ports", []))
    assert "TRAINYARD_SECRET_KEY" in services["web"]["environment"]
    assert "admin-token" in " ".join(services["migrate"]["command"])


def test_compose_file_validates_with_docker_client_when_available():
    import shutil

    import pytest

    if shutil.which("docker") is None or subprocess.run(["docker", "compose", "version"],
                                                        capture_output=True).returncode != 0:
        pytest.skip("no docker client with the compose plugin on this machine")
    result = subprocess.run(
        ["docker", "compose", "-f", "docker-compose.yml", "config", "--quiet"], cwd=ROOT,
        capture_output=True, text=True,
        env={"POSTGRES_PASSWORD": "x", "REDIS_PASSWORD": "y", "PATH": "/usr/bin:/bin:/usr/local/bin"},
    )
    assert result.returncode == 0, result.stderr


def test_nothing_reads_the_environment_or_connects_at_import():
    # Importing every module with a broken environment must succeed: settings are read when built.
    code = (
        "import os\n"
        "class Watched(dict):\n"
        "    seen = set()\n"
        "    def __getitem__(self, key):\n"
        "        self.seen.add(key)\n"
        "        return super().__getitem__(key)\n"
        "    def get(self, key, default=None):\n"
        "        self.seen.add(key)\n"
        "        return super().get(key, default)\n"
        "os.environ = Watched(os.environ)\n"
        "import importlib, pkgutil\n"
        "import trainyard, trainyard_workers, trainyard_web\n"
        "for pkg in (trainyard, trainyard_workers, trainyard_web):\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        if m.name.endswith('__main__'): continue\n"
        "        importlib.import_module(m.name)\n"
        "read = sorted(k for k in os.environ.seen if isinstance(k, str) and k.startswith('TRAINYARD_'))\n"
        "print('ok' if not read else f'read at import: {read}')\n"
    )
    env = {"TRAINYARD_PORT": "not-a-port", "TRAINYARD_DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:1/x",
           "PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(str(ROOT / p) for p in ("platform", "workers", "web"))}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_imports_go_one_way():
    # trainyard imports neither trainyard_web nor trainyard_workers; web and workers never import each other.
    import ast

    forbidden = {"platform": ("trainyard_web", "trainyard_workers"), "web": ("trainyard_workers",),
                 "workers": ("trainyard_web",)}
    offenders = []
    for folder, banned in forbidden.items():
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in banned]
    assert offenders == []
