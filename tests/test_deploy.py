"""The deployment files keep their promises, as far as reading them can tell (Docker is not
available to the tests): the Dockerfile runs `make run`'s command without the embedded
servers as a non-root user on a slim Python, and the Grafana dashboard only asks Prometheus
for metrics the gateway exports, covering every family of SPEC §7."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.cli import _parser
from gateway.metrics import Metrics
from tests.support import REPO

DOCKERFILE = REPO / "Dockerfile"
DASHBOARD = REPO / "deploy" / "grafana-dashboard.json"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus.yml"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

# SPEC §7: the metric families the gateway promises (and the dashboard must show)
SPEC_FAMILIES = {
    "gateway_requests_total",
    "gateway_request_duration_seconds",
    "gateway_overhead_duration_seconds",
    "gateway_upstream_duration_seconds",
    "gateway_tokens_total",
    "gateway_credits_consumed_total",
    "gateway_rate_limited_total",
    "gateway_access_denied_total",
    "gateway_upstream_errors_total",
    "gateway_fallbacks_total",
    "gateway_reservations_total",
}
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
}
METRIC_NAME = re.compile(r"\bgateway_[a-z0-9_]+")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        result.append((keyword.upper(), args.strip()))
        pending = ""
    assert pending == "", "the Dockerfile ends in a continuation line"
    return result


DOCKER = instructions(DOCKERFILE)


def only(keyword: str) -> list[str]:
    return [args for kw, args in DOCKER if kw == keyword]


def env() -> dict[str, str]:
    values: dict[str, str] = {}
    for args in only("ENV"):
        for pair in shlex.split(args):
            name, _, value = pair.partition("=")
            values[name] = value
    return values


def exec_form(args: str) -> list[str]:
    argv = json.loads(args)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), args
    return argv


def test_base_image_is_a_slim_python_the_project_supports() -> None:
    *_, base = only("FROM")
    image = base.split()[0]
    match = re.fullmatch(
        r"python:(\d+)\.(\d+)(?:\.\d+)?-slim(?:-[a-z]+)?(?:@sha256:[0-9a-f]+)?", image
    )
    assert match, f"not a slim Python image: {image}"
    minimum = re.fullmatch(r">=(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"])
    assert minimum
    assert (int(match[1]), int(match[2])) >= (int(minimum[1]), int(minimum[2])) >= (3, 11)


def test_runs_as_a_non_root_user() -> None:
    users = only("USER")
    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    keywords = [kw for kw, _ in DOCKER]
    assert keywords.index("USER") < keywords.index("CMD")
    # the user can write $GATEWAY_HOME (the generated admin key, multi-worker metrics files)
    home = env()["GATEWAY_HOME"]
    assert any(f"--home-dir {home}" in run and "--create-home" in run for run in only("RUN"))


def test_exposes_8080_and_checks_healthz_without_curl() -> None:
    assert only("EXPOSE") == ["8080"]
    [healthcheck] = only("HEALTHCHECK")
    options, _, command = healthcheck.partition(" CMD ")
    argv = exec_form(command)
    assert argv[0] == "python" and "urllib.request" in argv[-1]
    assert "http://127.0.0.1:8080/healthz" in argv[-1]
    assert "--timeout=" in options and "--start-period=" in options


def test_command_is_make_run_without_the_embedded_servers() -> None:
    [cmd] = only("CMD")
    argv = exec_form(cmd)
    assert not only("ENTRYPOINT")
    assert argv[0] == "llm-gateway" and "llm-gateway" in PYPROJECT["project"]["scripts"]
    image = vars(_parser().parse_args(argv[1:]))

    recipe = (REPO / "Makefile").read_text().split("\nrun:", 1)[1].split("\n\n", 1)[0]
    [line] = [line for line in recipe.splitlines() if "llm-gateway serve" in line]
    make_run = shlex.split(line.split("llm-gateway", 1)[1].replace("$(RUN_ARGS)", ""))
    local = vars(_parser().parse_args(make_run))

    differ = {name for name in image if image[name] != local[name]}
    assert differ <= {"config", "host", "port"}, "the image's command is not make run's"
    assert image["command"] == "serve" and image["sandbox"] and image["demo"]
    assert (image["host"], image["port"]) == ("0.0.0.0", 8080)
    assert Path(image["config"]).name == Path(local["config"]).name == "config.yaml"
    assert env()["GATEWAY_CONFIG"] == image["config"]

    # without the embedded extra, serve requires DATABASE_URL / REDIS_URL
    installs = [run for run in only("RUN") if "pip install" in run]
    assert installs and not any("embedded" in run for run in installs)


def test_image_is_offline_and_finds_its_files() -> None:
    values = env()
    assert values["LITELLM_LOCAL_MODEL_COST_MAP"] == "True"
    assert values["PYTHONUNBUFFERED"] == "1"
    [workdir] = only("WORKDIR")
    copied = {args.split()[-1].rstrip("/") for args in only("COPY")}
    # the packages land in site-packages, so the migrations are found through GATEWAY_SQL_DIR
    assert values["GATEWAY_SQL_DIR"] == f"{workdir}/sql" and "./sql" in copied
    assert Path(values["GATEWAY_CONFIG"]).parent == Path(workdir)
    assert any("config.yaml" in args.split()[:-1] for args in only("COPY"))
    for package in PYPROJECT["tool"]["setuptools"]["packages"]:
        top = package.split(".")[0]
        assert f"./{top}" in copied, f"{top} is not copied into the image"


def test_dependencies_layer_is_installed_before_the_source_is_copied() -> None:
    first_install = next(i for i, (kw, args) in enumerate(DOCKER) if "pip install" in args)
    early = [args for kw, args in DOCKER[:first_install] if kw in {"COPY", "ADD"}]
    assert early == ["pyproject.toml ./"], "only pyproject.toml may come before the deps layer"
    source = [i for i, (kw, args) in enumerate(DOCKER) if kw == "COPY" and "gateway" in args]
    assert source and min(source) > first_install
    later = [args for kw, args in DOCKER[min(source) :] if kw == "RUN" and "pip install" in args]
    assert later and "--no-deps" in later[0], "the source install must not redo the deps layer"


def test_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    ignored = {
        line.strip().rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".gateway", ".git"} <= ignored


# The dashboard


def exported_names() -> dict[str, str]:
    """Every series name Metrics() can export -> its family's name as SPEC §7 spells it."""
    names: dict[str, str] = {}
    for family in Metrics().registry.collect():
        spelled = family.name + ("_total" if family.type == "counter" else "")
        for suffix in ("", *SUFFIXES[family.type]):
            names[family.name + suffix] = spelled
    return names


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def expressions() -> list[str]:
    return [target["expr"] for panel in panels() for target in panel["targets"]]


def test_dashboard_is_a_grafana_dashboard_on_a_templated_prometheus() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 36 and board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    source = variables["DS_PROMETHEUS"]
    assert (source["type"], source["query"]) == ("datasource", "prometheus")
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        assert panel["targets"] and panel["title"] and {"h", "w", "x", "y"} <= set(panel["gridPos"])


def test_dashboard_only_queries_metrics_the_gateway_exports() -> None:
    exported = exported_names()
    queries = [*expressions(), *(json.dumps(v) for v in dashboard()["templating"]["list"])]
    referenced = {name for query in queries for name in METRIC_NAME.findall(query)}
    assert referenced, "no gateway metric in the dashboard"
    assert referenced - set(exported) == set()


def test_dashboard_covers_every_family_of_spec_section_7() -> None:
    exported = exported_names()
    assert SPEC_FAMILIES <= set(exported.values()), "SPEC §7 and gateway.metrics disagree"
    shown = {exported[name] for e in expressions() for name in METRIC_NAME.findall(e)}
    assert SPEC_FAMILIES - shown == set()


@pytest.mark.parametrize(
    "family",
    [
        "gateway_request_duration_seconds",
        "gateway_overhead_duration_seconds",
        "gateway_upstream_duration_seconds",
    ],
)
def test_latency_panels_are_quantiles_over_buckets(family: str) -> None:
    quantiles = [e for e in expressions() if f"{family}_bucket" in e]
    assert quantiles
    for expr in quantiles:
        assert expr.startswith("histogram_quantile(") and "by (le" in expr and "rate(" in expr


def test_prometheus_example_scrapes_the_gateway_metrics_endpoint() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    [job] = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8080"]
