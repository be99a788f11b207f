"""The deployment files: docker-compose.yml, .env.example, the Dockerfile, deploy/pgbouncer/ and deploy/kubernetes/.

They cannot run here (no Docker engine, no cluster), so these tests read them: their structure, and that
every command they run names something this checkout really has.
"""

from __future__ import annotations

import configparser
import importlib
import importlib.metadata
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from bisect import bisect
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import click
import pytest
import typer.main
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)
SERVICES = COMPOSE["services"]
ONE_SHOT = {"migrate"}
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")
K8S_DIR = ROOT / "deploy" / "kubernetes"


def _k8s_documents() -> list[dict]:
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _own_image(service: dict) -> bool:
    return "build" in service


# ---- docker-compose.yml -------------------------------------------------------------------------------


def test_compose_has_every_part_of_a_real_deployment():
    assert {"postgres", "pgbouncer", "mlflow-postgres", "redis", "mlflow", "migrate", "web", "reconciler",
            "flower", "worker-gpu0", "worker-gpu1"} <= set(SERVICES)
    env = COMPOSE["x-trainyard-env"]
    assert env["TRAINYARD_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert env["TRAINYARD_BROKER_URL"].startswith("redis://:${REDIS_PASSWORD")
    assert env["TRAINYARD_MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    # Jobs that name no queue go to the generic GPU queue every GPU worker consumes.
    assert SERVICES["web"]["environment"]["TRAINYARD_QUEUE"] == "gpu"
    assert "TRAINYARD_SECRET_KEY" in SERVICES["web"]["environment"]
    assert "admin-token" in " ".join(SERVICES["migrate"]["command"])


def test_every_long_running_service_has_a_health_check():
    for name, service in SERVICES.items():
        if name in ONE_SHOT:
            continue
        check = service.get("healthcheck")
        assert check and not check.get("disable") and check.get("test"), f"{name} has no health check"


def test_services_wait_for_healthy_dependencies_and_the_finished_migration():
    for name, service in SERVICES.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on without conditions"
        for dependency, rule in depends.items():
            expected = "service_completed_successfully" if dependency in ONE_SHOT else "service_healthy"
            assert rule["condition"] == expected, f"{name} → {dependency}"
        if _own_image(service) and name not in ONE_SHOT | {"mlflow", "flower"}:
            # Everything that opens the platform database waits until it is migrated.
            assert "migrate" in depends, f"{name} does not wait for migrate"
    assert SERVICES["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert SERVICES["mlflow"]["depends_on"]["mlflow-postgres"]["condition"] == "service_healthy"


def _gpu_worker_services() -> dict[str, dict]:
    return {n: s for n, s in SERVICES.items() if re.fullmatch(r"worker-gpu\d+", n)}


def test_worker_services_come_from_the_anchor_and_each_reserves_its_own_gpu():
    # The composed node tree still shows merge keys: each worker service must merge the x-gpu-worker node.
    root = yaml.compose(COMPOSE_TEXT)
    top = {k.value: v for k, v in root.value}
    anchor = top["x-gpu-worker"]
    services = {k.value: v for k, v in top["services"].value}
    workers = _gpu_worker_services()
    assert len(workers) >= 2
    seen = set()
    for name, service in workers.items():
        merged = [v for k, v in services[name].value if k.tag == "tag:yaml.org,2002:merge"]
        assert merged and merged[0] is anchor, f"{name} does not merge <<: *gpu-worker"
        index = name.removeprefix("worker-gpu")
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "device_ids": [index], "capabilities": ["gpu"]}], name
        assert service["hostname"].endswith(f"-gpu{index}"), name
        assert service["command"][:2] == ["trainyard", "worker"]
        seen.add(index)
    assert len(seen) == len(workers)
    anchor_data = COMPOSE["x-gpu-worker"]
    assert "deploy" not in anchor_data  # a device reserved in the anchor would go to every worker


def test_redis_persists_and_requires_a_password():
    command = SERVICES["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--requirepass") + 1].startswith("${REDIS_PASSWORD:?")


def test_mlflow_uses_its_own_database_not_the_platforms():
    platform_url = COMPOSE["x-trainyard-env"]["TRAINYARD_DATABASE_URL"]
    command = SERVICES["mlflow"]["command"]
    mlflow_url = command[command.index("--backend-store-uri") + 1]
    host_db = re.compile(r"@([^:/]+):\d+/(\w+)$")
    assert host_db.search(mlflow_url).groups() != host_db.search(platform_url).groups()
    mlflow_host = host_db.search(mlflow_url).group(1)
    assert mlflow_host in SERVICES and SERVICES[mlflow_host]["environment"]["POSTGRES_DB"] == \
        host_db.search(mlflow_url).group(2)
    # The platform's URL names the pooler; the server behind it is not MLflow's either, and MLflow's own
    # store is reached directly, not through the platform's pooler.
    target = _pooled_target(_database_url(platform_url)["db"])
    assert (target["host"], target["dbname"]) != host_db.search(mlflow_url).groups()
    assert mlflow_host != "pgbouncer"


# ---- the connection pooler ----------------------------------------------------------------------------

DATABASE_URL = re.compile(r"^postgresql\+psycopg://(?P<user>[^:@/]+):(?P<password>\$\{[^}]+\})"
                          r"@(?P<host>[^:/@]+):(?P<port>\d+)/(?P<db>\w+)$")
PGBOUNCER_INI_IN_CONTAINER = "/etc/pgbouncer/pgbouncer.ini"
WORKERS_TO_HOLD = 1000  # the target: a thousand GPU workers
POOL_PER_WORKER_PROCESS = 2  # a worker process's SQLAlchemy pool, at most


def _database_url(url: str) -> dict[str, str]:
    match = DATABASE_URL.match(url)
    assert match, f"not a postgresql+psycopg://user:${{PASSWORD}}@host:port/db URL: {url}"
    return match.groupdict()


def _pgbouncer_ini() -> configparser.ConfigParser:
    """The pgbouncer.ini the pgbouncer service mounts, parsed (only `;`/`#` lines are comments there)."""
    mounts = {}
    for volume in SERVICES["pgbouncer"]["volumes"]:
        source, target, *mode = volume.split(":")
        mounts[target] = (source, mode)
    assert PGBOUNCER_INI_IN_CONTAINER in mounts, "pgbouncer runs without the repository's pgbouncer.ini"
    source, mode = mounts[PGBOUNCER_INI_IN_CONTAINER]
    assert mode == ["ro"], "the entrypoint must not rewrite the mounted pgbouncer.ini"
    path = ROOT / source
    assert source.startswith("./") and path.is_file(), source
    ini = configparser.ConfigParser(interpolation=None, comment_prefixes=(";", "#"), inline_comment_prefixes=None)
    ini.read_string(path.read_text())
    return ini


def _pooled_target(database: str) -> dict[str, str]:
    """Where PgBouncer sends clients of `database`: its [databases] entry as a dict (host, port, dbname)."""
    databases = _pgbouncer_ini()["databases"]
    assert database in databases, f"pgbouncer has no [databases] entry {database!r}"
    return dict(item.split("=", 1) for item in databases[database].split())


def _postgres_max_connections() -> int:
    command = " ".join(str(a) for a in SERVICES["postgres"].get("command") or [])
    match = re.search(r"max_connections=(\d+)", command)
    return int(match.group(1)) if match else 100  # PostgreSQL's default


def _runs_migrations(service: dict) -> bool:
    return any(argv[:3] == ["trainyard", "db", "upgrade"] for argv in _commands(service))


def _opens_platform_database(name: str, service: dict) -> bool:
    # The same services the migration test above expects to wait for `migrate`; Flower only reads the broker.
    return _own_image(service) and name not in ONE_SHOT | {"mlflow", "flower"}


def test_pgbouncer_pools_transactions_with_the_platform_databases_credentials():
    service = SERVICES["pgbouncer"]
    assert re.fullmatch(r"[\w./-]*pgbouncer:v?\d+\.\d+\.\d+(-p\d+)?", service["image"]), \
        f"pin a PgBouncer version: {service['image']}"
    ini = _pgbouncer_ini()
    settings = ini["pgbouncer"]
    assert settings["pool_mode"] == "transaction"
    # Transaction mode: nothing is reset between clients (an absent key would mean DISCARD ALL).
    assert "server_reset_query" in settings and settings["server_reset_query"] == ""
    assert "extra_float_digits" in [p.strip() for p in settings["ignore_startup_parameters"].split(",")]
    assert settings["auth_type"] == "scram-sha-256"

    # Clients: a thousand workers' pools fit, with room to spare.
    max_client_conn = int(settings["max_client_conn"])
    assert max_client_conn >= 2 * WORKERS_TO_HOLD * POOL_PER_WORKER_PROCESS
    # Servers: what PgBouncer may open stays well inside PostgreSQL's max_connections (3 are reserved for
    # superusers), leaving room for the direct connections (migrations, psql, KEDA, a second pooler).
    pool = int(settings["default_pool_size"]) + int(settings.get("reserve_pool_size", "0"))
    cap = int(settings.get("max_db_connections", "0")) or pool
    assert int(settings["default_pool_size"]) >= 10
    assert pool <= cap, "max_db_connections would silently cut the pool below default_pool_size + reserve_pool_size"
    assert cap + 10 <= _postgres_max_connections() - 3, f"{cap} server connections leave no room to connect directly"
    nofile = service["ulimits"]["nofile"]
    soft = nofile["soft"] if isinstance(nofile, dict) else nofile
    assert soft >= max_client_conn + cap, "PgBouncer would run out of file descriptors before max_client_conn"

    # Behind it: the postgres service's database, as the postgres service's own role and password. The image's
    # entrypoint writes them to the auth file; plain text (AUTH_TYPE scram-sha-256 or plain) so PgBouncer can
    # log in to PostgreSQL, whose stored passwords are SCRAM.
    postgres = SERVICES["postgres"]["environment"]
    assert _pooled_target(postgres["POSTGRES_DB"]) == {"host": "postgres", "port": "5432",
                                                       "dbname": postgres["POSTGRES_DB"]}
    env = service["environment"]
    assert env["DB_USER"] == postgres["POSTGRES_USER"]
    assert env["DB_PASSWORD"] == postgres["POSTGRES_PASSWORD"]
    assert env["AUTH_TYPE"] in {"scram-sha-256", "plain"}
    assert not {"DB_HOST", "DATABASE_URL"} & set(env)  # the mounted pgbouncer.ini says where, not the env

    check = service["healthcheck"]["test"]
    assert check[:2] == ["CMD", "pg_isready"] and check[check.index("-p") + 1] == settings["listen_port"]
    assert service["depends_on"] == {"postgres": {"condition": "service_healthy"}}


def test_every_platform_database_url_goes_through_pgbouncer_except_the_migrations():
    listen_port = _pgbouncer_ini()["pgbouncer"]["listen_port"]
    postgres = SERVICES["postgres"]["environment"]
    pooled, direct = set(), set()
    for name, service in SERVICES.items():
        url = (service.get("environment") or {}).get("TRAINYARD_DATABASE_URL")
        if url is None:
            assert not _runs_migrations(service), f"{name} migrates without a database URL"
            continue
        parts = _database_url(url)
        assert (parts["user"], parts["password"]) == (postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"]), name
        if _runs_migrations(service):
            # DDL and its locks go straight to PostgreSQL, not through a transaction pooler.
            assert name in ONE_SHOT, f"{name} runs migrations but is not the one-shot"
            assert (parts["host"], parts["port"], parts["db"]) == ("postgres", "5432", postgres["POSTGRES_DB"]), name
            direct.add(name)
        else:
            assert (parts["host"], parts["port"]) == ("pgbouncer", listen_port), f"{name} bypasses pgbouncer: {url}"
            assert _pooled_target(parts["db"])["dbname"] == postgres["POSTGRES_DB"], name
            pooled.add(name)
    assert direct == {"migrate"}
    assert {"web", "serve", "reconciler", "flower"} | set(_gpu_worker_services()) <= pooled
    assert _database_url(COMPOSE["x-trainyard-env"]["TRAINYARD_DATABASE_URL"])["host"] == "pgbouncer"


def test_database_clients_start_only_once_pgbouncer_is_healthy():
    clients = {name for name, service in SERVICES.items() if _opens_platform_database(name, service)}
    assert {"web", "serve", "reconciler"} | set(_gpu_worker_services()) <= clients
    for name in clients:
        depends = SERVICES[name].get("depends_on", {})
        assert depends.get("pgbouncer") == {"condition": "service_healthy"}, f"{name} does not wait for pgbouncer"
    # The workers get it from their shared anchor, so a newly copied worker-gpuN waits too.
    assert COMPOSE["x-gpu-worker"]["depends_on"]["pgbouncer"] == {"condition": "service_healthy"}


def test_ui_without_their_own_login_are_published_on_loopback_only():
    for name in ("mlflow", "flower"):
        ports = SERVICES[name]["ports"]
        assert ports and all(str(p).startswith("127.0.0.1:") for p in ports), name
    assert "FLOWER_BASIC_AUTH" in SERVICES["flower"]["environment"]
    assert "${FLOWER_PASSWORD:?" in SERVICES["flower"]["environment"]["FLOWER_BASIC_AUTH"]


def test_no_secret_is_written_into_the_compose_file():
    def values(node):
        if isinstance(node, dict):
            for key, value in node.items():
                yield from ((key, v) for v in values(value)) if not isinstance(value, str) else [(key, value)]
        elif isinstance(node, list):
            for item in node:
                yield from values(item)
        else:
            yield ("", node)

    for key, value in values(COMPOSE):
        if re.search(r"PASSWORD|SECRET|AUTH", str(key)):
            assert "${" in str(value), f"{key} holds a literal"
        for password in re.findall(r"://[^:/@]*:([^@]+)@", str(value)):
            assert password.startswith("${"), f"a literal password in {value}"


def test_every_variable_the_compose_file_uses_is_in_env_example():
    example = (ROOT / ".env.example").read_text()
    documented = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", example, flags=re.MULTILINE))
    used = set(VARIABLE.findall(COMPOSE_TEXT))
    assert used, "the compose file uses no variables?"
    assert used - documented == set()
    assert documented - used == set()  # nothing stale either
    required = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*):\?", COMPOSE_TEXT))
    assert {"POSTGRES_PASSWORD", "MLFLOW_DB_PASSWORD", "REDIS_PASSWORD", "TRAINYARD_SECRET_KEY",
            "FLOWER_PASSWORD"} <= required


# ---- every command names something that exists ---------------------------------------------------------


def _commands(service: dict) -> list[list[str]]:
    command = service.get("command")
    if command is None:
        return []
    argv = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
    if argv[:2] == ["sh", "-c"]:
        return [shlex.split(part) for part in argv[2].split("&&")]
    return [argv]


def _check_click(group, argv: list[str], what: str) -> None:
    """Walk `argv` through a click (or Typer's vendored click) command tree: every subcommand and --option
    must exist. Duck-typed: Typer's groups are not `click.Group` instances."""
    command = group
    words = list(argv)
    while words and hasattr(command, "get_command") and not words[0].startswith("-"):
        name = words.pop(0)
        sub = command.get_command(None, name)
        assert sub is not None, f"{what}: no subcommand {name!r}"
        command = sub
    known = {opt for p in command.params for opt in getattr(p, "opts", []) + getattr(p, "secondary_opts", [])}
    for word in words:
        if word.startswith("--"):
            assert word.split("=", 1)[0] in known, f"{what}: no option {word!r} (has {sorted(known)})"


def _check_argv(argv: list[str], where: str) -> None:
    what = f"{where}: {' '.join(argv)}"
    if argv[0] == "trainyard":
        from trainyard.cli import app

        _check_click(typer.main.get_command(app), argv[1:], what)
    elif argv[:2] == ["python", "-m"]:
        # `python -m X` runs X/__main__.py; mlflow's calls its CLI at import, so read mlflow.cli instead.
        module = importlib.import_module({"mlflow": "mlflow.cli"}.get(argv[2], f"{argv[2]}.__main__"))
        groups = [v for v in vars(module).values() if isinstance(v, (typer.Typer, click.Group))]
        assert groups, f"{what}: {argv[2]} has no command-line group"
        group = typer.main.get_command(groups[0]) if isinstance(groups[0], typer.Typer) else groups[0]
        _check_click(group, argv[3:], what)
    elif argv[0] == "celery":
        assert "flower" in argv, what
        importlib.import_module("flower")
        assert "flower" in {e.name for e in importlib.metadata.entry_points(group="celery.commands")}
        workdir = next(a.split("=", 1)[1] for a in argv if a.startswith("--workdir="))
        config = next(a.split("=", 1)[1] for a in argv if a.startswith("--config="))
        assert (ROOT / workdir.removeprefix("/app/") / f"{config}.py").is_file(), what
    elif argv[0] == "gunicorn":
        from gunicorn.config import Config

        options, target = argv[1:-1], argv[-1]
        Config().parser().parse_args([o.replace("${TRAINYARD_WEB_WORKERS:-4}", "4") for o in options])
        module, _, call = target.partition(":")
        assert callable(getattr(importlib.import_module(module), call.removesuffix("()"))), what
    elif argv[0] == "python" and argv[1].startswith("/app/"):
        script = ROOT / argv[1].removeprefix("/app/")
        assert script.is_file(), what
        result = subprocess.run([sys.executable, str(script), argv[2], "--help"], capture_output=True, text=True, check=False)
        assert result.returncode == 0, f"{what}: {result.stderr}"
    else:
        raise AssertionError(f"{what}: a command these tests do not know how to check")


def test_every_service_command_and_health_check_names_something_that_exists():
    checked = 0
    for name, service in SERVICES.items():
        if not _own_image(service):
            continue  # postgres and redis images: their commands are theirs
        for argv in _commands(service):
            _check_argv(argv, name)
            checked += 1
        test = service.get("healthcheck", {}).get("test")
        if test and test[0] == "CMD":
            _check_argv(test[1:], f"{name} healthcheck")
            checked += 1
    assert checked >= 2 * len([s for s in SERVICES.values() if _own_image(s)]) - 1


def test_the_command_checker_refuses_what_does_not_exist():
    # The check above must be able to fail: an unknown subcommand, option or module is refused.
    for argv in (["trainyard", "wrker"], ["trainyard", "worker", "--gpu-count=2"],
                 ["python", "-m", "trainyard_workers", "reconcile"], ["python", "/app/deploy/nothing.py", "http"]):
        with pytest.raises((AssertionError, ModuleNotFoundError)):
            _check_argv(argv, "test")


# ---- the health-check script ---------------------------------------------------------------------------


def test_http_health_check_accepts_only_the_statuses_it_is_given():
    sys.path.insert(0, str(ROOT / "deploy"))
    try:
        healthcheck = importlib.import_module("healthcheck")
    finally:
        sys.path.remove(str(ROOT / "deploy"))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response({"/ok": 200, "/locked": 401}.get(self.path, 503))
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        assert healthcheck.main(["http", f"{base}/ok"]) == 0
        assert healthcheck.main(["http", f"{base}/down"]) == 1
        assert healthcheck.main(["http", f"{base}/locked"]) == 1
        assert healthcheck.main(["http", f"{base}/locked", "--accept", "200,401"]) == 0
    finally:
        server.shutdown()
    assert healthcheck.main(["http", f"{base}/ok", "--timeout", "1"]) == 1  # nobody listening any more


# ---- Dockerfile -----------------------------------------------------------------------------------------


def test_dockerfile_installs_the_pinned_torch_as_a_non_root_user():
    text = (ROOT / "Dockerfile").read_text()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, flags=re.MULTILINE))
    assert f"torch=={args['TORCH_VERSION']}" in deps
    assert f"torchvision=={args['TORCHVISION_VERSION']}" in deps
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", args["TORCH_INDEX_URL"])
    assert args["PYTHON_IMAGE"].startswith("python:3.11")  # requires-python is 3.11
    users = re.findall(r"^USER (\S+)", text, flags=re.MULTILINE)
    assert users and users[-1] not in {"root", "0"}
    assert re.search(r"^HEALTHCHECK ", text, flags=re.MULTILINE)
    for folder in ("platform", "workers", "web", "migrations", "deploy"):
        assert re.search(rf"^COPY {folder} {folder}$", text, flags=re.MULTILINE), folder
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".env" in ignored and ".venv" in ignored and "deploy" not in ignored


# ---- deploy/kubernetes ----------------------------------------------------------------------------------


def _redis_lists(queue: str) -> set[str]:
    """The Redis lists kombu keeps `queue`'s messages in, for every priority the platform sends with."""
    from trainyard.config import Settings
    from trainyard.queueing import CeleryDispatch, celery_config

    settings = Settings(broker_url="redis://:x@127.0.0.1:1/0", data_dir=ROOT / ".trainyard")
    options = celery_config(settings)["broker_transport_options"]
    dispatch = CeleryDispatch(settings)
    sent = []
    dispatch.app.send_task = lambda *a, **kw: sent.append(kw["priority"])
    for priority in range(-1, 5):
        dispatch(1, queue, priority)
    steps = options["priority_steps"]
    names = set()
    for priority in sent:
        step = steps[bisect(steps, priority) - 1]  # kombu.transport.redis.Channel.priority
        names.add(f"{queue}{options['sep']}{step}" if step else queue)
    return names


def test_every_worker_deployment_has_a_scaled_object_on_its_queue_lists():
    docs = _k8s_documents()
    deployments = {d["metadata"]["name"]: d for d in docs
                   if d["kind"] == "Deployment" and d["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"}
    scaled = {d["spec"]["scaleTargetRef"]["name"]: d for d in docs if d["kind"] == "ScaledObject"}
    auths = {d["metadata"]["name"]: d for d in docs if d["kind"] == "TriggerAuthentication"}
    secret_keys = {k for d in docs if d["kind"] == "Secret" for k in d["stringData"]}
    assert len(deployments) >= 2 and set(scaled) == set(deployments)
    generic_watchers = []
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod["nodeSelector"]["nvidia.com/gpu.product"]
        command = container["command"]
        assert command[:2] == ["trainyard", "worker"]
        _check_argv(command, name)
        queues = command[command.index("--queues") + 1].split(",")
        assert queues[0].startswith("gpu.") and queues[-1] == "gpu"
        spec = scaled[name]["spec"]
        triggers = spec["triggers"]
        lists = {t["metadata"]["listName"] for t in triggers if t["type"] == "redis"}
        assert _redis_lists(queues[0]) <= lists, name
        if _redis_lists("gpu") <= lists:
            generic_watchers.append(name)
        # The formula sums every trigger; running jobs of this Deployment's own pods are among them.
        formula = spec["advanced"]["scalingModifiers"]["formula"]
        assert set(re.findall(r"\w+", formula)) == {t["name"] for t in triggers}
        assert all(part.strip() in {t["name"] for t in triggers} for part in formula.split("+"))
        running = [t for t in triggers if t["type"] == "postgresql"]
        assert len(running) == 1 and f"@{name}-" in running[0]["metadata"]["query"]
        for trigger in triggers:
            auth = auths[trigger["authenticationRef"]["name"]]
            assert {ref["key"] for ref in auth["spec"]["secretTargetRef"]} <= secret_keys
            assert "password" not in trigger["metadata"]
    assert len(generic_watchers) == 1, f"the generic gpu queue must scale exactly one pool: {generic_watchers}"


def test_worker_deployments_read_their_secrets_from_the_secret():
    for doc in _k8s_documents():
        if doc["kind"] != "Deployment":
            continue
        (container,) = doc["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container.get("env", [])}
        for name in ("TRAINYARD_DATABASE_URL", "TRAINYARD_BROKER_URL"):
            assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "trainyard-secrets"


# ---- the docker client, where there is one ----------------------------------------------------------------


def test_compose_file_validates_with_docker_client_when_available():
    if shutil.which("docker") is None or subprocess.run(["docker", "compose", "version"],
                                                        capture_output=True, check=False).returncode != 0:
        pytest.skip("no docker client with the compose plugin on this machine")
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin"}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if re.match(r"^[A-Z_][A-Z0-9_]*=", line):
            key, _, value = line.partition("=")
            env[key] = value
    result = subprocess.run(["docker", "compose", "-f", "docker-compose.yml", "--env-file", ".env.example",
                             "config", "--quiet"], cwd=ROOT, capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, result.stderr
