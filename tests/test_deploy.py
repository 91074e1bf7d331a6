"""deploy/ checked against the server without running it: the Kubernetes manifests (flags parse,
probe paths are routes, ports agree, the grace period covers the drain), the HAProxy template
and deploy/render.py, and the metric names deploy/README.md tells a router to read.
tests/test_replicas.py runs the HAProxy recipe for real."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from server.app import create_app
from server.settings import Settings, parse_args

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def load_render() -> ModuleType:
    """deploy/render.py as a module (deploy/ is not a package)."""
    spec = importlib.util.spec_from_file_location("deploy_render", DEPLOY / "render.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def docs() -> dict[str, dict[str, Any]]:
    """The manifests of deploy/k8s, by "Kind/name"."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            out[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return out


def app_routes() -> dict[str, set[str]]:
    """Route path -> its methods, from the app itself (no model is loaded)."""
    app = create_app(Settings())
    return {rule.rule: set(rule.methods or ()) for rule in app.url_map.iter_rules()}


def container(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    pod = docs["Deployment/nurserve"]["spec"]["template"]["spec"]
    assert len(pod["containers"]) == 1
    return pod["containers"][0]


def test_k8s_container_runs_the_server_with_valid_flags(docs: dict[str, dict[str, Any]]) -> None:
    c = container(docs)
    assert c["command"] == ["python", "-m", "server"]
    env = {e["name"]: e["value"] for e in c.get("env", [])}
    settings = parse_args(c["args"], environ=env)  # exits 2 on an unknown flag or a bad value
    assert settings.host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == settings.port
    requests = c["resources"]["requests"]
    assert {"cpu", "memory"} <= requests.keys()


def test_k8s_probes_use_the_servers_routes(docs: dict[str, dict[str, Any]]) -> None:
    c = container(docs)
    routes = app_routes()
    settings = parse_args(c["args"], environ={})
    want = {"startupProbe": "/liveness", "livenessProbe": "/liveness"}
    want["readinessProbe"] = "/readiness"
    for probe, path in want.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path and "GET" in routes[path], probe
        assert get["port"] in ("http", settings.port), probe
    startup = c["startupProbe"]
    # the probe waits at least as long as the server lets the model load
    assert startup["periodSeconds"] * startup["failureThreshold"] >= settings.startup_timeout_s


def test_k8s_grace_period_covers_the_drain(docs: dict[str, dict[str, Any]]) -> None:
    pod = docs["Deployment/nurserve"]["spec"]["template"]["spec"]
    c = container(docs)
    settings = parse_args(c["args"], environ={})
    sleep = c["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    # Hypercorn's shutdown_timeout is the grace + 5 s (server/__main__.py)
    drain_s = float(sleep[1]) + settings.shutdown_grace_s + 5.0
    assert pod["terminationGracePeriodSeconds"] > drain_s


def test_k8s_services_select_the_pods(docs: dict[str, dict[str, Any]]) -> None:
    deployment = docs["Deployment/nurserve"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    port_names = {p["name"] for p in container(docs)["ports"]}
    for name in ("Service/nurserve", "Service/nurserve-replicas"):
        spec = docs[name]["spec"]
        assert spec["selector"].items() <= labels.items(), name
        assert {p["targetPort"] for p in spec["ports"]} <= port_names, name
    assert docs["Service/nurserve-replicas"]["spec"]["clusterIP"] == "None"


def test_haproxy_template_checks_readiness() -> None:
    text = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    check = re.search(r"^\s*option httpchk GET (\S+)$", text, re.MULTILINE)
    assert check and check.group(1) == "/readiness" and "GET" in app_routes()["/readiness"]
    assert re.search(r"^\s*balance leastconn$", text, re.MULTILINE)
    # a request already sent is never replayed (only its own clients may fail)
    retry_on = re.search(r"^\s*retry-on (.+)$", text, re.MULTILINE)
    assert retry_on and set(retry_on.group(1).split()) == {"conn-failure", "503"}


def test_render_fills_every_placeholder() -> None:
    render = load_render()
    lines = render.server_lines(["127.0.0.1:8081", "b=10.0.0.2:8082"])
    assert lines.splitlines() == [
        "    server replica1 127.0.0.1:8081",
        "    server b 10.0.0.2:8082",
    ]
    assert render.render("a {{x}} {{y}}", {"x": "1", "y": "2"}) == "a 1 2"
    with pytest.raises(ValueError, match="no value"):
        render.render("{{x}} {{y}}", {"x": "1"})
    with pytest.raises(ValueError, match="no placeholders"):
        render.render("{{x}}", {"x": "1", "z": "2"})


@pytest.mark.parametrize(
    ("replicas", "message"),
    [
        ([], "at least one"),
        (["nohost"], "HOST:PORT"),
        (["h:0"], "HOST:PORT"),
        (["h:port"], "HOST:PORT"),
        (["bad name=h:1"], "the name"),
        (["a=h:1", "a=h:2"], "unique"),
    ],
)
def test_render_refuses_bad_replicas(replicas: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_render().server_lines(replicas)


def test_rendered_config_is_valid_haproxy(tmp_path: Path) -> None:
    out = tmp_path / "haproxy.cfg"
    cmd = [sys.executable, str(DEPLOY / "render.py"), "-o", str(out)]
    cmd += ["--replica", "127.0.0.1:8081", "--replica", "127.0.0.1:8082"]
    subprocess.run(cmd, check=True, timeout=30)
    text = out.read_text()
    assert "{{" not in text and text.count("\n    server replica") == 2
    bad = subprocess.run([*cmd[:-4], "--fall", "0", "--replica", "h:1"], capture_output=True)
    assert bad.returncode == 2 and b"--fall must be positive" in bad.stderr
    exe = shutil.which("haproxy")
    if exe is None:
        pytest.skip("haproxy is not installed: the rendered text is not checked by haproxy -c")
    check = subprocess.run([exe, "-c", "-f", str(out)], capture_output=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr


def test_readme_names_only_real_metrics() -> None:
    """Every nurserve_*/lightllm_* name deploy/README.md cites is one /metrics exposes."""
    source = (ROOT / "server" / "metrics.py").read_text()
    names = set(
        re.findall(r"\b(?:nurserve|lightllm)_[a-z_]+\b", (DEPLOY / "README.md").read_text())
    )
    assert names, "deploy/README.md names no metric"
    missing = sorted(n for n in names if f'"{n}"' not in source)
    assert not missing, missing
