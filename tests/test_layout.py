"""The repository's own promises: layout, packaging pins, import rules. (Deployment files: test_deploy.py.)"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

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
