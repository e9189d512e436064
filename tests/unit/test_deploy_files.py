"""Static checks of the deployment files: coordinator/ and worker/ Dockerfiles, deploy/compose.yaml,
Prometheus, Grafana, deploy/k8s/ and deploy/systemd/.

Docker, Kubernetes, Prometheus, Grafana and systemd are not run here. Instead every file is parsed,
and every name or path it refers to is looked up where it must exist: in the repository, in the other
deployment files, in the real CLI parser (`antorcha.cli.build_parser`) and in the real config loader
(`antorcha.config.load_config`). Deleting a referenced file or misspelling a name fails a test.
"""

from __future__ import annotations

import argparse
import configparser
import json
import re
import shlex
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from antorcha.cli import build_parser
from antorcha.config import CoordinatorConfig, WorkerConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILES = {"coordinator": ROOT / "coordinator" / "Dockerfile", "worker": ROOT / "worker" / "Dockerfile"}
SYSTEMD_UNIT = DEPLOY / "systemd" / "antorcha-worker.service"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "antorcha.json"

# The metrics that the coordinator and workers export (name -> type, labels besides job/instance).
METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "antorcha_round": ("gauge", frozenset()),
    "antorcha_active_workers": ("gauge", frozenset()),
    "antorcha_tokens_total": ("counter", frozenset()),
    "antorcha_train_loss": ("gauge", frozenset()),
    "antorcha_eval_loss": ("gauge", frozenset()),
    "antorcha_inner_step_seconds": ("histogram", frozenset()),
    "antorcha_outer_step_seconds": ("histogram", frozenset()),
    "antorcha_bytes_sent_total": ("counter", frozenset({"plane"})),
    "antorcha_bytes_received_total": ("counter", frozenset({"plane"})),
    "antorcha_worker_events_total": ("counter", frozenset({"event"})),
    "antorcha_rejected_requests_total": ("counter", frozenset({"reason"})),
    "antorcha_compute_utilisation": ("gauge", frozenset()),
    "antorcha_checkpoint_age_seconds": ("gauge", frozenset()),
    "antorcha_excluded_workers_total": ("counter", frozenset({"reason"})),
    "antorcha_spot_checks_total": ("counter", frozenset({"result"})),
}
COORDINATOR_HTTP_PORT = 8080  # [coordinator] http_port: dashboard + /metrics
WORKER_METRICS_PORT = 9100  # [worker] metrics_port
# Labels that Prometheus adds to every series (`role` by deploy/prometheus.yml), and histograms' `le`.
TARGET_LABELS = frozenset({"job", "instance", "role", "le"})

DOCKERFILE_INSTRUCTIONS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
    "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}  # fmt: skip
TINI = "/usr/bin/tini"


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ---- parsers --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    name: str
    args: str
    line: int


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with line continuations joined; comments and parser directives dropped."""
    instructions: list[Instruction] = []
    buf, start = "", 0
    for no, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comment lines are dropped inside continuations too, as Docker does
        if not buf:
            start = no
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        name, _, args = buf.partition(" ")
        instructions.append(Instruction(name.upper(), args.strip(), start))
        buf = ""
    assert not buf, f"{_rel(path)}: the file ends inside a line continuation"
    return instructions


def _global_args(instructions: list[Instruction]) -> dict[str, str]:
    """ARG defaults declared before the first FROM (the ones FROM lines may use)."""
    args: dict[str, str] = {}
    for ins in instructions:
        if ins.name == "FROM":
            break
        if ins.name == "ARG":
            key, _, value = ins.args.partition("=")
            args[key.strip()] = value.strip().strip('"')
    return args


def _substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], text)


def _stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    stages: list[list[Instruction]] = []
    for ins in instructions:
        if ins.name == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def _final_stage(path: Path) -> list[Instruction]:
    return _stages(parse_dockerfile(path))[-1]


def _last(stage: list[Instruction], name: str) -> Instruction | None:
    found = [i for i in stage if i.name == name]
    return found[-1] if found else None


def _exec_form(ins: Instruction) -> list[str]:
    assert ins.args.startswith("["), f"line {ins.line}: {ins.name} should use the exec (JSON) form"
    argv = json.loads(ins.args)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), f"line {ins.line}"
    return argv


def _copy_sources(ins: Instruction) -> list[str] | None:
    """Source paths of COPY/ADD relative to the build context; None when copied from another stage."""
    words = json.loads(ins.args) if ins.args.startswith("[") else shlex.split(ins.args)
    flags = [w for w in words if w.startswith("--")]
    if any(f.startswith("--from=") for f in flags):
        return None
    paths = [w for w in words if not w.startswith("--")]
    assert len(paths) >= 2, f"line {ins.line}: {ins.name} needs a source and a destination"
    return paths[:-1]


def _exposed_ports(path: Path) -> set[int]:
    ports: set[int] = set()
    for ins in _final_stage(path):
        if ins.name == "EXPOSE":
            ports.update(int(p.split("/")[0]) for p in ins.args.split())
    return ports


def _volumes(path: Path) -> set[str]:
    out: set[str] = set()
    for ins in _final_stage(path):
        if ins.name == "VOLUME":
            out.update(json.loads(ins.args) if ins.args.startswith("[") else ins.args.split())
    return out


def _image_argv(path: Path) -> list[str]:
    stage = _final_stage(path)
    entrypoint, cmd = _last(stage, "ENTRYPOINT"), _last(stage, "CMD")
    assert entrypoint is not None and cmd is not None, f"{_rel(path)}: needs ENTRYPOINT and CMD"
    return _exec_form(entrypoint) + _exec_form(cmd)


@cache
def _dockerignore() -> tuple[tuple[bool, re.Pattern[str]], ...]:
    def to_regex(pattern: str) -> re.Pattern[str]:
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
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out)

    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        rules.append((negate, to_regex(line.lstrip("!").strip().strip("/"))))
    return tuple(rules)


def docker_ignored(rel_path: str) -> bool:
    """Whether .dockerignore keeps `rel_path` out of the build context (Docker's rules: a pattern
    matching the path or one of its parents applies; the last one that applies wins)."""
    parts = PurePosixPath(rel_path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negate, regex in _dockerignore():
        if any(regex.fullmatch(c) for c in candidates):
            ignored = not negate
    return ignored


def _strict_parser() -> argparse.ArgumentParser:
    """The real CLI parser, minus abbreviations: deployment files spell options out in full."""
    parser = build_parser()
    parsers = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers.extend(action.choices.values())
    for p in parsers:
        p.allow_abbrev = False
    return parser


def check_cli(argv: list[str], where: str) -> Any:
    """`argv` runs `antorcha` with arguments that the real CLI parser accepts; returns the namespace."""
    assert argv, f"{where}: empty command"
    assert PurePosixPath(argv[0]).name == "antorcha", f"{where}: runs {argv[0]!r}, not antorcha"
    try:
        return _strict_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"{where}: `{shlex.join(argv)}` is not accepted by antorcha's CLI")


def _strip_tini(argv: list[str], where: str) -> list[str]:
    assert argv[:2] == [TINI, "--"], f"{where}: must start with {TINI} -- (antorcha must not be PID 1)"
    return argv[2:]


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@cache
def _compose() -> dict[str, Any]:
    return _load_yaml(DEPLOY / "compose.yaml")


def _k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs.extend((path, d) for d in yaml.safe_load_all(path.read_text()) if d is not None)
    return docs


def _k8s(kind: str, name: str) -> dict[str, Any]:
    found = [d for _, d in _k8s_docs() if d.get("kind") == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"deploy/k8s: expected one {kind} {name}, found {len(found)}"
    return found[0]


def _kustomization() -> dict[str, Any]:
    return _load_yaml(K8S / "kustomization.yaml")


def _maddr_ports(maddrs: list[str]) -> set[int]:
    return {int(m) for a in maddrs for m in re.findall(r"/tcp/(\d+)", a)}


def _env_field(name: str, model: type) -> None:
    """An ANTORCHA_<SECTION>__<FIELD> variable must name a real field of `model`."""
    if name == "ANTORCHA_LOG_LEVEL":  # read by antorcha.logs, not a config field
        return
    m = re.fullmatch(r"ANTORCHA_([A-Z0-9_]+?)__([A-Z0-9_]+)", name)
    assert m, f"{name}: not of the form ANTORCHA_<SECTION>__<FIELD>"
    section, field = m.group(1).lower(), m.group(2).lower()
    assert section in model.model_fields, f"{name}: no [{section}] section in {model.__name__}"
    section_type = model.model_fields[section].annotation
    assert field in section_type.model_fields, f"{name}: no field {field!r} in [{section}]"


# ---- every file parses ----------------------------------------------------------------------------


def test_every_yaml_file_parses() -> None:
    paths = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    assert len(paths) >= 10, [_rel(p) for p in paths]
    for path in paths:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), f"{_rel(path)}: no YAML mapping"


@pytest.mark.parametrize(
    ("path", "model"),
    [
        (DEPLOY / "coordinator.toml", CoordinatorConfig),
        (DEPLOY / "worker.toml", WorkerConfig),
        (K8S / "coordinator.toml", CoordinatorConfig),
        (K8S / "worker.toml", WorkerConfig),
        (ROOT / "worker" / "example.toml", WorkerConfig),  # what the systemd install note copies
    ],
    ids=lambda v: _rel(v) if isinstance(v, Path) else v.__name__,
)
def test_toml_configs_load_with_the_real_loader(path: Path, model: type) -> None:
    load_config(model, path, environ={})


def test_configs_serve_metrics_on_the_scraped_ports() -> None:
    for path in (DEPLOY / "coordinator.toml", K8S / "coordinator.toml"):
        assert load_config(CoordinatorConfig, path, environ={}).coordinator.http_port == COORDINATOR_HTTP_PORT
    for path in (DEPLOY / "worker.toml", K8S / "worker.toml"):
        assert load_config(WorkerConfig, path, environ={}).worker.metrics_port == WORKER_METRICS_PORT


# ---- Dockerfiles ----------------------------------------------------------------------------------


@pytest.mark.parametrize("role", sorted(DOCKERFILES))
def test_dockerfile_instructions_are_known(role: str) -> None:
    instructions = parse_dockerfile(DOCKERFILES[role])
    assert instructions and instructions[0].name in {"ARG", "FROM"}
    for ins in instructions:
        assert ins.name in DOCKERFILE_INSTRUCTIONS, f"{role}/Dockerfile:{ins.line}: unknown {ins.name}"


@pytest.mark.parametrize("role", sorted(DOCKERFILES))
def test_dockerfile_copy_sources_exist_in_the_build_context(role: str) -> None:
    copies = [i for i in parse_dockerfile(DOCKERFILES[role]) if i.name in {"COPY", "ADD"}]
    assert copies
    for ins in copies:
        for source in _copy_sources(ins) or []:
            path = ROOT / source
            where = f"{role}/Dockerfile:{ins.line}: {source}"
            assert path.exists(), f"{where} does not exist"
            assert not docker_ignored(source), f"{where} is excluded by .dockerignore"
            for file in path.rglob("*.py") if path.is_dir() else []:
                if "__pycache__" not in file.parts:
                    assert not docker_ignored(_rel(file)), f"{where}: {_rel(file)} excluded by .dockerignore"


@pytest.mark.parametrize("role", sorted(DOCKERFILES))
def test_dockerfile_runs_the_right_antorcha_subcommand_under_tini(role: str) -> None:
    path = DOCKERFILES[role]
    argv = _strip_tini(_image_argv(path), f"{role}/Dockerfile")
    args = check_cli(argv, f"{role}/Dockerfile ENTRYPOINT+CMD")
    assert args.command == role
    # The image carries a default config at the path its CMD reads.
    copied = {
        shlex.split(i.args)[-1]: shlex.split(i.args)[-2]
        for i in _final_stage(path)
        if i.name == "COPY" and "--from=" not in i.args
    }
    assert args.config in copied, f"{role}/Dockerfile: nothing is copied to {args.config}"
    assert copied[args.config] == f"deploy/{role}.toml"


def test_coordinator_image_has_a_healthcheck_that_the_cli_accepts() -> None:
    healthcheck = _last(_final_stage(DOCKERFILES["coordinator"]), "HEALTHCHECK")
    assert healthcheck is not None
    m = re.fullmatch(r"((?:--\S+\s+)*)CMD\s+(.*)", healthcheck.args)
    assert m, healthcheck.args
    args = check_cli(json.loads(m.group(2)), "coordinator/Dockerfile HEALTHCHECK")
    assert args.command == "health"  # Discover: answers without a token, so auth on does not fail it
    config = load_config(CoordinatorConfig, DEPLOY / "coordinator.toml", environ={})
    assert args.coordinator.endswith(f":{config.coordinator.port}")


@pytest.mark.parametrize("role", sorted(DOCKERFILES))
def test_dockerfile_runs_as_a_non_root_user(role: str) -> None:
    stage = _final_stage(DOCKERFILES[role])
    user = _last(stage, "USER")
    assert user is not None and user.args.split(":")[0] not in {"root", "0"}
    entrypoint = _last(stage, "ENTRYPOINT")
    assert entrypoint is not None and user.line < entrypoint.line


@pytest.mark.parametrize("role", sorted(DOCKERFILES))
def test_dockerfile_bakes_in_no_secret(role: str) -> None:
    for ins in parse_dockerfile(DOCKERFILES[role]):
        if ins.name in {"ENV", "ARG"}:
            assert not re.search(r"TOKEN|PASSWORD|SECRET", ins.args, re.I), f"line {ins.line}: {ins.args}"


def test_base_images_are_pinned_and_the_same_python() -> None:
    """Pinned tags; and one Python build for both images: the default corpus is its standard library."""
    bases: dict[str, set[str]] = {}
    for role, path in DOCKERFILES.items():
        instructions = parse_dockerfile(path)
        args, stage_names = _global_args(instructions), set()
        bases[role] = set()
        for ins in instructions:
            if ins.name != "FROM":
                continue
            words = _substitute(ins.args, args).split()
            image = words[0]
            if len(words) == 3 and words[1].lower() == "as":
                stage_names.add(words[2])
            if image in stage_names:
                continue
            assert re.search(r":\d+\.\d+\.\d+|@sha256:[0-9a-f]{64}", image), f"{role}: {image} is not pinned"
            bases[role].add(image)
    assert bases["coordinator"] == bases["worker"], bases


def test_images_expose_and_keep_what_the_configs_use() -> None:
    coordinator = load_config(CoordinatorConfig, DEPLOY / "coordinator.toml", environ={}).coordinator
    exposed = _exposed_ports(DOCKERFILES["coordinator"])
    assert {coordinator.port, COORDINATOR_HTTP_PORT} | _maddr_ports(coordinator.p2p_host_maddrs) <= exposed
    assert coordinator.data_dir in _volumes(DOCKERFILES["coordinator"])

    worker = load_config(WorkerConfig, DEPLOY / "worker.toml", environ={}).worker
    worker_ports = {WORKER_METRICS_PORT} | _maddr_ports(worker.p2p_host_maddrs)
    assert worker_ports <= _exposed_ports(DOCKERFILES["worker"])
    assert str(PurePosixPath(worker.identity_file).parent) in _volumes(DOCKERFILES["worker"])


def test_worker_image_lets_the_container_runtime_mount_cuda() -> None:
    env = " ".join(i.args for i in _final_stage(DOCKERFILES["worker"]) if i.name == "ENV")
    assert re.search(r"NVIDIA_DRIVER_CAPABILITIES=\S*compute", env)


# ---- compose --------------------------------------------------------------------------------------


def test_compose_has_the_services_and_their_dockerfiles() -> None:
    services = _compose()["services"]
    assert {"coordinator", "worker-1", "worker-2", "prometheus", "grafana"} <= set(services)
    for name, role in (("coordinator", "coordinator"), ("worker-1", "worker"), ("worker-2", "worker")):
        build = services[name]["build"]
        context = (DEPLOY / build["context"]).resolve()
        assert context == ROOT, f"{name}: build context must be the repository root (.dockerignore)"
        assert (context / build["dockerfile"]).resolve() == DOCKERFILES[role].resolve()
        assert (context / build["dockerfile"]).is_file()
        assert services[name].get("image"), f"{name}: name the built image"
    for name in ("prometheus", "grafana"):
        assert re.search(r":v?\d+\.\d+\.\d+$", services[name]["image"]), f"{name}: pin the image"


def _compose_mounts() -> list[tuple[str, str, str]]:
    """(service, host path or volume name, container path) of every volume entry."""
    mounts = []
    for name, service in _compose()["services"].items():
        for entry in service.get("volumes", []):
            if isinstance(entry, dict):
                source, target = entry.get("source", ""), entry["target"]
            else:
                source, target = entry.split(":")[:2]
            mounts.append((name, source, target))
    return mounts


def test_compose_mounts_exist() -> None:
    named = set(_compose().get("volumes") or {})
    mounts = _compose_mounts()
    assert mounts
    for service, source, target in mounts:
        assert target.startswith("/"), f"{service}: {target}"
        if source.startswith((".", "/")):
            assert (DEPLOY / source).exists(), f"{service}: host path {source} does not exist"
        else:
            assert source in named, f"{service}: volume {source} is not declared"


def test_compose_mounts_configs_where_the_images_read_them() -> None:
    mounts = {(s, src): dst for s, src, dst in _compose_mounts()}
    for service, role in (("coordinator", "coordinator"), ("worker-1", "worker"), ("worker-2", "worker")):
        command = _compose()["services"][service].get("command")
        argv = _strip_tini(_image_argv(DOCKERFILES[role]), role)
        if command is not None:  # replaces CMD, keeps the ENTRYPOINT
            argv = argv[:1] + (shlex.split(command) if isinstance(command, str) else command)
        args = check_cli(argv, f"compose {service}")
        assert mounts.get((service, f"./{role}.toml")) == args.config, f"{service}: config not mounted"


def test_compose_environment_names_real_settings_and_loads() -> None:
    for service, role, model in (
        ("coordinator", "coordinator", CoordinatorConfig),
        ("worker-1", "worker", WorkerConfig),
        ("worker-2", "worker", WorkerConfig),
    ):
        env = _compose()["services"][service].get("environment") or {}
        if isinstance(env, list):
            env = dict(e.split("=", 1) for e in env)
        for name in env:
            _env_field(name, model)
        # ${VAR:-} interpolations become empty strings, as with an unset variable.
        values = {k: re.sub(r"\$\{[^}]*\}", "", str(v)) for k, v in env.items()}
        load_config(model, DEPLOY / f"{role}.toml", environ=values)


def test_compose_workers_reach_the_coordinator_by_service_name() -> None:
    worker = load_config(WorkerConfig, DEPLOY / "worker.toml", environ={}).worker
    coordinator = load_config(CoordinatorConfig, DEPLOY / "coordinator.toml", environ={}).coordinator
    host, port = worker.coordinator.rsplit(":", 1)
    assert host in _compose()["services"] and host == "coordinator"
    assert int(port) == coordinator.port


# ---- Prometheus and Grafana -----------------------------------------------------------------------


def _prometheus() -> dict[str, Any]:
    return _load_yaml(DEPLOY / "prometheus.yml")


def _service_dockerfile(service: str) -> Path:
    build = _compose()["services"][service]["build"]
    return (DEPLOY / build["context"] / build["dockerfile"]).resolve()


def test_prometheus_targets_are_compose_services_on_exposed_ports() -> None:
    jobs = _prometheus()["scrape_configs"]
    targets = [t for job in jobs for sc in job["static_configs"] for t in sc["targets"]]
    assert {t.split(":")[0] for t in targets} >= {"coordinator", "worker-1", "worker-2"}
    for target in targets:
        host, port = target.rsplit(":", 1)
        assert host in _compose()["services"], f"prometheus target {target}: no such compose service"
        assert int(port) in _exposed_ports(_service_dockerfile(host)), f"{target}: port not exposed"
    assert len({job["job_name"] for job in jobs}) == len(jobs)


def test_grafana_datasource_points_at_the_prometheus_service() -> None:
    [datasource] = _load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yaml")["datasources"]
    assert datasource["type"] == "prometheus" and datasource["uid"]
    m = re.fullmatch(r"http://([\w-]+):(\d+)", datasource["url"])
    assert m and m.group(1) in _compose()["services"] and m.group(1) == "prometheus"
    assert datasource["jsonData"]["timeInterval"] == _prometheus()["global"]["scrape_interval"]


def test_grafana_dashboard_provider_reads_the_mounted_dashboards() -> None:
    [provider] = _load_yaml(DEPLOY / "grafana/provisioning/dashboards/antorcha.yaml")["providers"]
    mounts = {src: dst for service, src, dst in _compose_mounts() if service == "grafana"}
    assert mounts.get("./grafana/dashboards") == provider["options"]["path"]
    assert mounts.get("./grafana/provisioning/dashboards") == "/etc/grafana/provisioning/dashboards"
    assert mounts.get("./grafana/provisioning/datasources") == "/etc/grafana/provisioning/datasources"
    assert DASHBOARD.parent == DEPLOY / "grafana/dashboards" and DASHBOARD.is_file()
    home = _compose()["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"


def _dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query in the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    [datasource] = _load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yaml")["datasources"]
    assert dashboard["uid"] and dashboard["title"]
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    queries = []
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource["uid"], panel["title"]
            queries.append((panel["title"], target["expr"]))
    return queries


def _series_names() -> set[str]:
    names = set()
    for name, (kind, _) in METRICS.items():
        names.update({f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name})
    return names


def test_dashboard_queries_use_only_the_exported_metrics() -> None:
    used: set[str] = set()
    for title, expr in _dashboard_queries():
        names = set(re.findall(r"\bantorcha_\w+", expr))
        assert names, f"{title}: {expr} uses no antorcha metric"
        assert names <= _series_names(), f"{title}: unknown metric(s) {sorted(names - _series_names())}"
        used |= {re.sub(r"_(bucket|sum|count)$", "", n) if n not in METRICS else n for n in names}
    assert used == set(METRICS), f"metrics without a panel: {sorted(set(METRICS) - used)}"


def test_dashboard_queries_use_each_metric_type_and_label_correctly() -> None:
    roles = {
        sc.get("labels", {}).get("role")
        for job in _prometheus()["scrape_configs"]
        for sc in job["static_configs"]
    }
    for title, expr in _dashboard_queries():
        names = set(re.findall(r"\bantorcha_\w+", expr))
        for name, (kind, _) in METRICS.items():
            if kind == "counter" and name in names:
                assert re.search(rf"\b(rate|increase)\(\s*{name}\b", expr), f"{title}: {name} is a counter"
            if kind == "histogram" and f"{name}_bucket" in names:
                assert "histogram_quantile(" in expr and re.search(r"by \([^)]*\ble\b", expr), title
        labels = set(TARGET_LABELS)
        for name in names:
            labels |= METRICS.get(re.sub(r"_bucket$", "", name), ("", frozenset()))[1]
        used = set()
        for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            used |= {g.strip() for g in group.split(",") if g.strip()}
        for label, value in re.findall(r'(\w+)\s*=~?\s*"([^"]*)"', expr):
            used.add(label)
            if label == "role":
                assert value in roles, f"{title}: no scrape job has role={value!r}"
        assert used <= labels, f"{title}: unknown label(s) {sorted(used - labels)} in {expr}"


def test_metric_list_matches_the_exporter() -> None:
    """The names, types and labels above are the ones antorcha.dashboard.metrics registers."""
    from antorcha.dashboard import metrics
    exported: dict[str, tuple[str, frozenset[str]]] = {}
    for role in (metrics.CoordinatorMetrics, metrics.WorkerMetrics):
        for family in role().registry.collect():
            name = family.name + ("_total" if family.type == "counter" else "")
            labels = frozenset(k for sample in family.samples for k in sample.labels) - {"le"}
            assert exported.setdefault(name, (family.type, labels)) == (family.type, labels), name
    assert exported == METRICS


# ---- Kubernetes -----------------------------------------------------------------------------------


def test_k8s_manifests_are_well_formed_and_all_listed() -> None:
    docs = _k8s_docs()
    assert docs
    for path, doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), _rel(path)
        assert doc.get("metadata", {}).get("name"), _rel(path)
    kustomization = _kustomization()
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization["resources"]
    for resource in resources:
        assert (K8S / resource).is_file(), f"kustomization resource {resource} does not exist"
    assert {p.name for p, _ in docs} == set(resources), "every manifest is listed, and only those"
    for generator in kustomization.get("configMapGenerator", []) + kustomization.get("secretGenerator", []):
        for item in generator.get("files", []) + generator.get("envs", []):
            assert (K8S / item.split("=")[-1]).is_file(), f"{generator['name']}: {item} does not exist"


def _pod_spec(name: str) -> dict[str, Any]:
    return _k8s("Deployment", name)["spec"]["template"]["spec"]


def _generated(kind: str) -> dict[str, list[str]]:
    key = {"ConfigMap": "configMapGenerator", "Secret": "secretGenerator"}[kind]
    return {g["name"]: g.get("files", []) + g.get("envs", []) for g in _kustomization().get(key, [])}


def _container_config(deployment: str, role: str, model: type) -> tuple[Any, Any]:
    """The container's CLI args (checked) and the config it loads: the TOML that its ConfigMap mounts
    at the --config path, with the container's ANTORCHA_* environment on top."""
    spec = _pod_spec(deployment)
    [container] = spec["containers"]
    where = f"deploy/k8s {deployment}"
    assert "command" not in container, f"{where}: `command` would replace the image's tini ENTRYPOINT"
    entry = _strip_tini(_image_argv(DOCKERFILES[role]), role)[:1]
    args = check_cli(entry + container["args"], where)
    assert args.command == role
    user = _last(_final_stage(DOCKERFILES[role]), "USER")
    assert user is not None and spec["securityContext"]["runAsNonRoot"] is True
    uid = user.args.split(":")[0]
    assert str(spec["securityContext"]["runAsUser"]) == uid, f"{where}: not the image uid {uid}"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    config_dir, config_file = str(PurePosixPath(args.config).parent), PurePosixPath(args.config).name
    volume = volumes[mounts[config_dir]]
    assert volume["configMap"]["name"] in _generated("ConfigMap"), f"{where}: unknown ConfigMap"
    assert config_file in _generated("ConfigMap")[volume["configMap"]["name"]]
    env = {}
    for var in container.get("env", []):
        _env_field(var["name"], model)
        env[var["name"]] = var.get("value", "from-a-reference")
    config = load_config(model, K8S / config_file, environ=env)
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        if "exec" in container.get(probe, {}):
            check_cli(container[probe]["exec"]["command"], f"{where} {probe}")
    images = {i["name"] for i in _kustomization()["images"]}
    assert container["image"] in images, f"{where}: image {container['image']} has no kustomize entry"
    return container, config


def test_k8s_coordinator_is_one_recreated_pod_on_a_volume() -> None:
    deployment = _k8s("Deployment", "antorcha-coordinator")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    container, config = _container_config("antorcha-coordinator", "coordinator", CoordinatorConfig)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    settings = config.coordinator
    assert ports["grpc"] == settings.port
    assert {ports["p2p"]} == _maddr_ports(settings.p2p_host_maddrs)
    assert ports["http"] == COORDINATOR_HTTP_PORT
    volumes = {v["name"]: v for v in _pod_spec("antorcha-coordinator")["volumes"]}
    data = [m for m in container["volumeMounts"] if m["mountPath"] == settings.data_dir]
    assert data, "coordinator.data_dir is not a mounted volume"
    claim = volumes[data[0]["name"]]["persistentVolumeClaim"]["claimName"]
    assert _k8s("PersistentVolumeClaim", claim)["spec"]["resources"]["requests"]["storage"]
    assert "readinessProbe" in container and "livenessProbe" in container


def test_k8s_service_reaches_the_coordinator_ports() -> None:
    service = _k8s("Service", "antorcha-coordinator")
    pod_labels = _k8s("Deployment", "antorcha-coordinator")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    [container] = _pod_spec("antorcha-coordinator")["containers"]
    named = {p["name"] for p in container["ports"]}
    assert {p["name"] for p in service["spec"]["ports"]} == {"grpc", "p2p", "http"}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in named, f"Service port {port['name']}: no such container port"


def test_k8s_workers_request_a_gpu_and_dial_the_service() -> None:
    container, config = _container_config("antorcha-worker", "worker", WorkerConfig)
    resources = container["resources"]
    assert str(resources["limits"]["nvidia.com/gpu"]) == "1"
    assert str(resources.get("requests", {}).get("nvidia.com/gpu", "1")) == "1"
    host, port = config.worker.coordinator.rsplit(":", 1)
    service = _k8s("Service", host)
    assert int(port) in {p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert {ports["p2p"]} == _maddr_ports(config.worker.p2p_host_maddrs)
    assert ports["metrics"] == WORKER_METRICS_PORT
    identity_dir = str(PurePosixPath(config.worker.identity_file).parent)
    assert identity_dir in {m["mountPath"] for m in container["volumeMounts"]}


def test_k8s_worker_token_comes_from_the_generated_secret() -> None:
    [container] = _pod_spec("antorcha-worker")["containers"]
    [token] = [e for e in container["env"] if e["name"] == "ANTORCHA_WORKER__TOKEN"]
    ref = token["valueFrom"]["secretKeyRef"]
    secrets = _generated("Secret")
    assert ref["name"] in secrets
    keys = set()
    for env_file in secrets[ref["name"]]:
        for line in (K8S / env_file).read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                keys.add(line.split("=", 1)[0].strip())
    assert ref["key"] in keys


# ---- systemd --------------------------------------------------------------------------------------


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string(SYSTEMD_UNIT.read_text())
    return parser


def test_systemd_unit_parses_and_runs_the_worker() -> None:
    unit = _unit()
    assert {"Unit", "Service", "Install"} <= set(unit.sections())
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"].lstrip("-@:+!"))
    assert argv[0].startswith("/"), "ExecStart needs an absolute path"
    args = check_cli(argv, "antorcha-worker.service ExecStart")
    assert args.command == "worker" and args.config
    assert service["Restart"] == "on-failure"
    assert service.get("User") not in {None, "root", "0"}
    assert service.get("EnvironmentFile"), "the token comes from an EnvironmentFile"
    assert service.get("NoNewPrivileges") == "yes"
    assert unit["Install"].get("WantedBy")


def test_systemd_unit_keeps_the_gpu_reachable() -> None:
    service = _unit()["Service"]
    for key in ("PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock", "MemoryDenyWriteExecute"):
        assert service.get(key, "no") == "no", f"{key}= would take CUDA away from the worker"
