"""Configuration: defaults < SSE_* environment < twistd options, and one-line errors."""

from pathlib import Path

import pytest
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins

from sse_twisted._config import SETTINGS, ConfigError, load_config
from sse_twisted._postgres import connection_parameters
from sse_twisted.tap import Options
from tests.secrets_tracking import new_password


@pytest.fixture
def certs_dir(tmp_path: Path) -> Path:
    return tmp_path


def test_defaults_match_the_go_service(certs_dir: Path) -> None:
    config = load_config({"SSE_CERTS_DIR": str(certs_dir)})
    assert config.port == 8001
    assert config.log_index == "sse"
    assert config.rabbitmq_queue_name == "messages"
    assert config.rabbitmq_vhost == "/"
    assert config.rabbitmq_tls is True
    assert config.rabbitmq_port == 5671
    assert config.postgres_sslmode == "verify-full"
    assert config.heartbeat_seconds == 15
    assert config.cors_origins == ("*",)


def test_environment_overrides_defaults_and_options_override_environment(
    certs_dir: Path,
) -> None:
    environ = {"SSE_CERTS_DIR": str(certs_dir), "SSE_PORT": "9000", "SSE_APP_ENV": "dev"}
    assert load_config(environ).port == 9000
    config = load_config(environ, {"port": "9100"})
    assert config.port == 9100
    assert config.app_env == "dev"


def test_plain_amqp_defaults_to_port_5672(certs_dir: Path) -> None:
    config = load_config({"SSE_CERTS_DIR": str(certs_dir), "SSE_RABBITMQ_TLS": "false"})
    assert config.rabbitmq_tls is False
    assert config.rabbitmq_port == 5672


def test_cors_origins_are_a_comma_separated_list(certs_dir: Path) -> None:
    environ = {"SSE_CERTS_DIR": str(certs_dir), "SSE_CORS_ORIGINS": "https://a.example, https://b"}
    assert load_config(environ).cors_origins == ("https://a.example", "https://b")


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("SSE_PORT", "eighty", "SSE_PORT: 'eighty' is not a port number"),
        ("SSE_PORT", "70000", "SSE_PORT: 70000 is out of range 0-65535"),
        ("SSE_APP_ENV", "staging", "SSE_APP_ENV: 'staging' is not one of dev, prod"),
        ("SSE_RABBITMQ_TLS", "maybe", "SSE_RABBITMQ_TLS: 'maybe' is not a boolean"),
        ("SSE_POSTGRES_SSLMODE", "strict", "SSE_POSTGRES_SSLMODE: 'strict' is not one of"),
        ("SSE_HEARTBEAT_SECONDS", "0", "SSE_HEARTBEAT_SECONDS: '0' must be a finite number"),
        ("SSE_POSTGRES_TIMEOUT_SECONDS", "inf", "SSE_POSTGRES_TIMEOUT_SECONDS: 'inf' must be a"),
        ("SSE_DRAIN_SECONDS", "nan", "SSE_DRAIN_SECONDS: 'nan' must be a finite number"),
        ("SSE_AUTH_CACHE_SECONDS", "-inf", "SSE_AUTH_CACHE_SECONDS: '-inf' must be a finite"),
        ("SSE_TRUSTED_PROXIES", "10.0.0.0/8,proxy", "SSE_TRUSTED_PROXIES: 'proxy' is not an IP"),
        ("SSE_RABBITMQ_MAX_AGE", "7 days", "SSE_RABBITMQ_MAX_AGE: '7 days' is not a RabbitMQ"),
        ("SSE_INGEST_BATCH_MS", "101", "SSE_INGEST_BATCH_MS: 101 is over 100 (milliseconds)"),
        ("SSE_CERTS_DIR", "/nonexistent/certs", "SSE_CERTS_DIR: '/nonexistent/certs' is not a"),
    ],
)
def test_a_wrong_value_names_the_setting_and_the_problem(
    certs_dir: Path, variable: str, value: str, expected: str
) -> None:
    environ = {"SSE_CERTS_DIR": str(certs_dir), variable: value}
    with pytest.raises(ConfigError) as raised:
        load_config(environ)
    assert str(raised.value).startswith(expected)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda setting: setting.env)
@pytest.mark.parametrize("value", ["inf", "nan", "-1", "1e400", "", " ", "0x10", "\x00"])
def test_no_value_of_any_setting_gets_past_loading_unchecked(
    certs_dir: Path, setting: object, value: str
) -> None:
    """Every setting either refuses the value in one line or holds a finite, usable value."""
    assert hasattr(setting, "env")
    try:
        config = load_config({"SSE_CERTS_DIR": str(certs_dir), setting.env: value})
    except ConfigError as error:
        assert str(error).startswith(f"{setting.env}: ")
        assert "\n" not in str(error)
        return
    loaded = getattr(config, setting.field)  # type: ignore[attr-defined]
    if isinstance(loaded, float):
        assert loaded == loaded and loaded not in (float("inf"), float("-inf"))


def test_a_wrong_option_is_named_as_the_option(certs_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"^--port: 'x' is not a port number$"):
        load_config({"SSE_CERTS_DIR": str(certs_dir)}, {"port": "x"})


def test_passwords_stay_out_of_the_config_repr(certs_dir: Path) -> None:
    environ = {
        "SSE_CERTS_DIR": str(certs_dir),
        "SSE_POSTGRES_PASSWORD": "pg-secret-1",
        "SSE_RABBITMQ_PASSWORD": "mq-secret-2",
    }
    config = load_config(environ)
    assert config.postgres_password == "pg-secret-1"
    assert "pg-secret-1" not in repr(config)
    assert "mq-secret-2" not in repr(config)


def test_every_setting_has_an_sse_environment_name_and_an_option() -> None:
    assert all(setting.env.startswith("SSE_") for setting in SETTINGS)
    assert len({setting.option for setting in SETTINGS}) == len(SETTINGS)
    assert len({setting.env for setting in SETTINGS}) == len(SETTINGS)


def test_the_plugin_is_discoverable_and_parses_options(certs_dir: Path) -> None:
    makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
    assert "sse-server" in makers
    options = makers["sse-server"].options()
    assert isinstance(options, Options)
    options = Options(environ={"SSE_PORT": "9001"})
    options.parseOptions(["--certs-dir", str(certs_dir), "--rabbitmq-tls", "false"])
    config = options["config"]
    assert config.port == 9001
    assert config.certs_dir == certs_dir
    assert config.rabbitmq_tls is False


def test_a_bad_option_exits_with_one_line(certs_dir: Path) -> None:
    options = Options(environ={})
    with pytest.raises(SystemExit) as raised:
        options.parseOptions(["--certs-dir", str(certs_dir), "--port", "http"])
    assert str(raised.value.code) == "sse-server: --port: 'http' is not a port number"


def test_the_auth_cache_is_on_by_default_and_zero_seconds_turns_it_off(certs_dir: Path) -> None:
    config = load_config({"SSE_CERTS_DIR": str(certs_dir)})
    assert (config.auth_cache_seconds, config.auth_cache_size) == (10, 10000)
    off = load_config({"SSE_CERTS_DIR": str(certs_dir), "SSE_AUTH_CACHE_SECONDS": "0"})
    assert off.auth_cache_seconds == 0
    for name, value, problem in [
        ("SSE_AUTH_CACHE_SECONDS", "-1", "must be a finite number, 0 or more"),
        ("SSE_AUTH_CACHE_SECONDS", "nan", "must be a finite number, 0 or more"),
        ("SSE_AUTH_CACHE_SIZE", "0", "is not a positive integer"),
    ]:
        with pytest.raises(ConfigError) as raised:
            load_config({"SSE_CERTS_DIR": str(certs_dir), name: value})
        assert str(raised.value) == f"{name}: {value!r} {problem}"


@pytest.mark.parametrize(
    ("variable", "field"),
    [
        ("SSE_POSTGRES_PASSWORD", "postgres_password"),
        ("SSE_RABBITMQ_PASSWORD", "rabbitmq_password"),
    ],
)
def test_a_password_is_read_from_the_file_its_file_variable_names(
    certs_dir: Path, tmp_path: Path, variable: str, field: str
) -> None:
    password = new_password()
    secret = tmp_path / "secret"
    # As `echo "$password" > file` or a Kubernetes secret written by an editor leaves it.
    secret.write_text(f"{password}\n")
    config = load_config({"SSE_CERTS_DIR": str(certs_dir), f"{variable}_FILE": str(secret)})
    assert getattr(config, field) == password
    assert password not in repr(config)


def test_a_password_file_option_overrides_the_environment(certs_dir: Path, tmp_path: Path) -> None:
    from_option, from_environment = new_password(), new_password()
    secret = tmp_path / "secret"
    secret.write_text(from_option)
    options = Options(
        environ={"SSE_CERTS_DIR": str(certs_dir), "SSE_POSTGRES_PASSWORD": from_environment}
    )
    options.parseOptions(["--postgres-password-file", str(secret)])
    assert options["config"].postgres_password == from_option


def test_a_password_and_its_file_both_set_is_refused_in_one_line(
    certs_dir: Path, tmp_path: Path
) -> None:
    password = new_password()
    secret = tmp_path / "secret"
    secret.write_text(password)
    environ = {
        "SSE_CERTS_DIR": str(certs_dir),
        "SSE_RABBITMQ_PASSWORD": password,
        "SSE_RABBITMQ_PASSWORD_FILE": str(secret),
    }
    with pytest.raises(ConfigError) as raised:
        load_config(environ)
    assert str(raised.value) == (
        "SSE_RABBITMQ_PASSWORD and SSE_RABBITMQ_PASSWORD_FILE are both set: keep one"
    )


def test_an_unreadable_password_file_is_refused_in_one_line_naming_the_variable(
    certs_dir: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "absent"
    with pytest.raises(ConfigError) as raised:
        load_config({"SSE_CERTS_DIR": str(certs_dir), "SSE_POSTGRES_PASSWORD_FILE": str(missing)})
    assert str(raised.value) == (
        f"SSE_POSTGRES_PASSWORD_FILE: cannot read {str(missing)!r}: No such file or directory"
    )
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError) as raised:
        load_config({"SSE_CERTS_DIR": str(certs_dir), "SSE_POSTGRES_PASSWORD_FILE": str(binary)})
    assert str(raised.value) == f"SSE_POSTGRES_PASSWORD_FILE: {str(binary)!r} is not UTF-8 text"


def test_only_secret_settings_have_a_file_variable(certs_dir: Path, tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    port_file.write_text("9999")
    config = load_config({"SSE_CERTS_DIR": str(certs_dir), "SSE_PORT_FILE": str(port_file)})
    assert config.port == 8001
    assert {setting.env for setting in SETTINGS if setting.secret} == {
        "SSE_POSTGRES_PASSWORD",
        "SSE_RABBITMQ_PASSWORD",
    }


# --- the engines as clusters: several RabbitMQ nodes, several PostgreSQL hosts ---


def test_a_single_broker_host_and_a_single_database_host_are_as_before(certs_dir: Path) -> None:
    config = load_config({"SSE_CERTS_DIR": str(certs_dir)})
    assert config.rabbitmq_host == "localhost"
    assert config.rabbitmq_initial_cluster_size is None
    assert config.postgres_host == "localhost"
    assert config.postgres_port == (5432,)
    assert config.postgres_target_session_attrs == "any"
    parameters = connection_parameters(config)
    assert (parameters["host"], parameters["port"]) == ("localhost", "5432")


def test_rabbitmq_nodes_and_replication_are_settings(certs_dir: Path) -> None:
    config = load_config(
        {
            "SSE_CERTS_DIR": str(certs_dir),
            "SSE_RABBITMQ_HOST": "rabbit-a,rabbit-b:5673,[::1]",
            "SSE_RABBITMQ_INITIAL_CLUSTER_SIZE": "3",
        }
    )
    assert config.rabbitmq_host == "rabbit-a,rabbit-b:5673,[::1]"
    assert config.rabbitmq_initial_cluster_size == 3


def test_postgres_hosts_take_libpqs_multi_host_form(certs_dir: Path) -> None:
    config = load_config(
        {
            "SSE_CERTS_DIR": str(certs_dir),
            "SSE_POSTGRES_HOST": "pg-a, pg-b",
            "SSE_POSTGRES_PORT": "5432,5433",
            "SSE_POSTGRES_TARGET_SESSION_ATTRS": "prefer-standby",
        }
    )
    parameters = connection_parameters(config)
    assert parameters["host"] == "pg-a,pg-b"
    assert parameters["port"] == "5432,5433"
    assert parameters["target_session_attrs"] == "prefer-standby"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"SSE_RABBITMQ_HOST": "a,,b"}, "SSE_RABBITMQ_HOST: 'a,,b' has an empty host"),
        ({"SSE_RABBITMQ_HOST": "a:99999"}, "SSE_RABBITMQ_HOST: 'a:99999': '99999' is not a port"),
        ({"SSE_RABBITMQ_INITIAL_CLUSTER_SIZE": "0"}, "SSE_RABBITMQ_INITIAL_CLUSTER_SIZE: '0'"),
        ({"SSE_POSTGRES_HOST": "a,"}, "SSE_POSTGRES_HOST: 'a,' has an empty host"),
        ({"SSE_POSTGRES_PORT": "5432,x"}, "SSE_POSTGRES_PORT: 'x' is not a port number"),
        (
            {"SSE_POSTGRES_HOST": "a,b,c", "SSE_POSTGRES_PORT": "5432,5433"},
            "SSE_POSTGRES_PORT: 2 ports for 3 hosts in SSE_POSTGRES_HOST",
        ),
        ({"SSE_POSTGRES_TARGET_SESSION_ATTRS": "master"}, "SSE_POSTGRES_TARGET_SESSION_ATTRS: "),
    ],
)
def test_a_malformed_host_list_is_refused_in_one_line(
    certs_dir: Path, environ: dict[str, str], expected: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config({"SSE_CERTS_DIR": str(certs_dir), **environ})
    assert str(raised.value).startswith(expected)
    assert "\n" not in str(raised.value)
