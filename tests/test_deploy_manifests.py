"""The systemd units and the Kubernetes manifest in deploy/ agree with the server.

No systemd runs as PID 1 here and no cluster is reachable: the units are checked by
``systemd-analyze verify`` (systemd's own parser, which also reads the binaries they name)
and by their keys; the manifest by its YAML, against the settings and the drain.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from sse_twisted._config import SETTINGS
from tests.twistd_processes import TWISTD

DEPLOY = Path(__file__).parent.parent / "deploy"
SOCKET_UNIT = DEPLOY / "systemd" / "sse-twisted.socket"
SERVICE_UNIT = DEPLOY / "systemd" / "sse-twisted.service"
MANIFEST = DEPLOY / "kubernetes" / "sse-twisted.yaml"
SETTINGS_BY_ENV = {setting.env: setting for setting in SETTINGS}
SETTING_NAMES = set(SETTINGS_BY_ENV) | {
    f"{setting.env}_FILE" for setting in SETTINGS if setting.secret
}


def setting(environment: dict[str, str], name: str) -> float:
    """The number ``environment`` sets for ``name``, else its default."""
    return float(SETTINGS_BY_ENV[name].parse(environment.get(name, SETTINGS_BY_ENV[name].default)))


def check_settings(environment: dict[str, str]) -> None:
    """Every variable is a setting, and every value one the server accepts (the
    certificate directory is on the target machine, not here)."""
    assert set(environment) <= SETTING_NAMES
    for name, value in environment.items():
        if name in SETTINGS_BY_ENV and name != "SSE_CERTS_DIR":
            SETTINGS_BY_ENV[name].parse(value)


def unit_entries(path: Path) -> list[tuple[str, str, str]]:
    """Each ``(section, key, value)`` of a unit file, in order (keys may repeat)."""
    entries, section = [], ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key, value))
    return entries


def unit_values(path: Path, section: str, key: str) -> list[str]:
    return [value for s, k, value in unit_entries(path) if (s, k) == (section, key)]


def seconds(text: str) -> float:
    """A systemd time span in plain seconds, or with an s/min suffix."""
    if text.endswith("min"):
        return float(text[:-3]) * 60
    return float(text.removesuffix("s"))


def test_systemd_analyze_verifies_both_units_without_a_warning(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    # verify checks that ExecStart's binary exists: point it at this checkout's twistd.
    for unit in (SOCKET_UNIT, SERVICE_UNIT):
        text = unit.read_text().replace("/opt/sse-twisted/bin/twistd", str(TWISTD))
        (tmp_path / unit.name).write_text(text)
    verified = subprocess.run(
        [analyze, "verify", str(tmp_path / SOCKET_UNIT.name), str(tmp_path / SERVICE_UNIT.name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # An unknown or misspelt key is only a warning (exit status 0): any output fails.
    assert (verified.returncode, verified.stdout, verified.stderr) == (0, "", "")


def test_the_socket_unit_hands_one_named_tcp_socket_to_the_service() -> None:
    assert len(unit_values(SOCKET_UNIT, "Socket", "ListenStream")) == 1
    assert unit_values(SOCKET_UNIT, "Socket", "FileDescriptorName") == ["https"]
    assert unit_values(SOCKET_UNIT, "Socket", "Service") == [SERVICE_UNIT.name]
    assert unit_values(SERVICE_UNIT, "Unit", "Requires") == [SOCKET_UNIT.name]


def test_the_service_serves_on_the_socket_it_is_given_and_drains_within_its_stop_timeout() -> None:
    environment = dict(
        value.partition("=")[::2] for value in unit_values(SERVICE_UNIT, "Service", "Environment")
    )
    check_settings(environment)
    drain = setting(environment, "SSE_DRAIN_SECONDS")
    assert unit_values(SERVICE_UNIT, "Service", "KillSignal") == ["SIGTERM"]
    assert seconds(unit_values(SERVICE_UNIT, "Service", "TimeoutStopSec")[0]) > drain + 10
    (exec_start,) = unit_values(SERVICE_UNIT, "Service", "ExecStart")
    # The option, not a variable: the EnvironmentFile overrides Environment= lines.
    assert exec_start.split()[1:] == [
        "--nodaemon",
        "--pidfile=",
        "sse-server",
        "--listen-socket",
        "systemd",
    ]


def test_the_service_reloads_the_certificate_with_sighup_and_has_descriptors_for_its_streams() -> (
    None
):
    assert unit_values(SERVICE_UNIT, "Service", "ExecReload") == ["/bin/kill -HUP $MAINPID"]
    (limit,) = unit_values(SERVICE_UNIT, "Service", "LimitNOFILE")
    assert int(limit) > setting({}, "SSE_MAX_STREAMS")


def manifest() -> dict[str, dict[str, Any]]:
    return {document["kind"]: document for document in yaml.safe_load_all(MANIFEST.read_text())}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(only)


def environment_of(container: dict[str, Any]) -> dict[str, str]:
    return {variable["name"]: variable["value"] for variable in container["env"]}


def https_port(container: dict[str, Any]) -> dict[str, Any]:
    (port,) = container["ports"]
    return dict(port)


def test_kubernetes_probes_ask_readyz_for_traffic_and_healthz_for_liveness_over_tls() -> None:
    sse = container(manifest()["Deployment"])
    port = https_port(sse)
    assert port["containerPort"] == int(environment_of(sse)["SSE_PORT"])
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert sse[probe]["httpGet"] == {"path": path, "port": port["name"], "scheme": "HTTPS"}
    # Readiness answers within a second; under a request flood it needs more (README).
    assert sse["readinessProbe"]["timeoutSeconds"] >= 2


def test_kubernetes_grace_period_covers_the_prestop_sleep_and_the_drain() -> None:
    deployment = manifest()["Deployment"]
    sse = container(deployment)
    command = sse["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    drain = setting(environment_of(sse), "SSE_DRAIN_SECONDS")
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(command[1]) + drain
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_kubernetes_settings_are_known_and_passwords_come_from_files() -> None:
    variables = environment_of(container(manifest()["Deployment"]))
    check_settings(variables)
    assert not {name for name in variables if name.endswith("_PASSWORD")}


def test_the_kubernetes_service_and_disruption_budget_select_the_deployment_s_pods() -> None:
    documents = manifest()
    labels = documents["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = documents["Service"]["spec"]
    assert service["selector"].items() <= labels.items()
    assert documents["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= (
        labels.items()
    )
    (port,) = service["ports"]
    assert port["targetPort"] == https_port(container(documents["Deployment"]))["name"]
