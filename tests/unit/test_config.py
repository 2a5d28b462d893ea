"""load_settings: validation, the provider rules, env and TOML precedence, secrets kept secret."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.config import (
    AUTO_MAX_CONCURRENCY,
    ConfigError,
    LocalModel,
    OversizePolicy,
    ProviderKind,
    Settings,
    environment_for,
    load_settings,
)

SECRET = "sk-very-secret-4242"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Nothing from the developer's shell may leak into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("EMBEDDING_WORKER_") or name.upper() == "DASHSCOPE_API_KEY":
            monkeypatch.delenv(name)
    yield


def test_defaults_are_the_local_model() -> None:
    s = load_settings()
    assert s.provider.kind is ProviderKind.LOCAL
    assert s.provider.model == LocalModel.USE.value
    assert s.provider.dimension == 512
    assert s.provider.max_texts_per_request is None  # the provider's own (test_embedders.py)
    assert s.oversize_policy is OversizePolicy.TRUNCATE


@pytest.mark.parametrize("kind", ["dashscope", "openai"])
def test_http_provider_without_key_fails_naming_the_variable(kind: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(provider={"kind": kind})
    assert "DASHSCOPE_API_KEY" in str(err.value)
    with pytest.raises(ConfigError, match="DASHSCOPE_API_KEY"):
        load_settings(provider={"kind": kind, "api_key": ""})


def test_dashscope_api_key_env_var_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DASHSCOPE_API_KEY", SECRET)
    s = load_settings(provider={"kind": "dashscope"})
    assert s.provider.api_key is not None
    assert s.provider.api_key.get_secret_value() == SECRET
    assert s.provider.model == "text-embedding-v4"
    assert s.provider.dimension == 1024
    assert s.provider.base_url == "https://dashscope-intl.aliyuncs.com/api/v1"


def test_explicit_api_key_wins_over_dashscope_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DASHSCOPE_API_KEY", "sk-from-env")
    s = load_settings(provider={"kind": "openai", "api_key": SECRET})
    assert s.provider.api_key is not None
    assert s.provider.api_key.get_secret_value() == SECRET
    assert s.provider.base_url == "https://dashscope-intl.aliyuncs.com/compatible-mode/v1"


def test_base_url_trailing_slash_is_removed() -> None:
    s = load_settings(provider={"kind": "openai", "api_key": SECRET, "base_url": "http://h:1/v1/"})
    assert s.provider.base_url == "http://h:1/v1"


@pytest.mark.parametrize("dimension", [100, 4096, 300])
def test_dashscope_refuses_a_dimension_it_does_not_offer(dimension: int) -> None:
    with pytest.raises(ConfigError, match=str(dimension)):
        load_settings(provider={"kind": "dashscope", "api_key": SECRET, "dimension": dimension})


def test_openai_dialect_accepts_any_dimension() -> None:
    s = load_settings(provider={"kind": "openai", "api_key": SECRET, "dimension": 300})
    assert s.provider.dimension == 300


def test_dashscope_refuses_more_than_ten_texts_per_request() -> None:
    base = {"kind": "dashscope", "api_key": SECRET}
    assert (
        load_settings(provider={**base, "max_texts_per_request": 10}).provider.max_texts_per_request
        == 10
    )
    with pytest.raises(ConfigError, match="max_texts_per_request"):
        load_settings(provider={**base, "max_texts_per_request": 11})


def test_local_model_dimension_mismatch_is_refused() -> None:
    with pytest.raises(ConfigError, match="512"):
        load_settings(provider={"kind": "local", "dimension": 384})
    with pytest.raises(ConfigError, match="384"):
        load_settings(
            provider={"kind": "local", "model": "multilingual-e5-small", "dimension": 512}
        )
    e5 = load_settings(provider={"kind": "local", "model": "multilingual-e5-small"})
    assert e5.provider.dimension == 384


def test_unknown_local_model_is_refused() -> None:
    with pytest.raises(ConfigError, match="not a bundled local model"):
        load_settings(provider={"kind": "local", "model": "text-embedding-v4"})


def test_concurrency_is_adaptive_up_to_a_high_ceiling_for_an_api_and_4_for_the_local_model() -> (
    None
):
    api = {"kind": "dashscope", "api_key": SECRET}
    auto = load_settings(provider=api).provider
    assert auto.max_concurrency is None and auto.concurrency_ceiling == AUTO_MAX_CONCURRENCY
    assert load_settings(provider={"kind": "local"}).provider.concurrency_ceiling == 4
    assert load_settings(provider={**api, "max_concurrency": 3}).provider.concurrency_ceiling == 3
    local = load_settings(provider={"kind": "local", "max_concurrency": 8})
    assert local.provider.concurrency_ceiling == 8
    with pytest.raises(ConfigError, match="min_concurrency"):
        load_settings(provider={**api, "min_concurrency": 4, "max_concurrency": 3})


def test_sparse_output_is_dashscope_native_only() -> None:
    native = {"kind": "dashscope", "api_key": SECRET, "output_type": "dense&sparse"}
    assert load_settings(provider=native).provider.sparse
    assert not load_settings(provider={**native, "output_type": "dense"}).provider.sparse
    for other in ({"kind": "openai", "api_key": SECRET}, {"kind": "local"}):
        with pytest.raises(ConfigError, match=r"provider\.output_type 'dense&sparse' needs"):
            load_settings(provider={**other, "output_type": "dense&sparse"})
    with pytest.raises(ConfigError, match="output_type"):
        load_settings(provider={**native, "output_type": "sparse"})  # no dense: not offered


def test_env_nested_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDDING_WORKER_KAFKA__GROUP_ID", "group-from-env")
    monkeypatch.setenv("EMBEDDING_WORKER_BATCH__LINGER_MS", "7")
    monkeypatch.setenv("EMBEDDING_WORKER_OVERSIZE_POLICY", "reject")
    s = load_settings()
    assert s.kafka.group_id == "group-from-env"
    assert s.kafka.input_topic == "content.events"  # siblings keep their defaults
    assert s.batch.linger_ms == 7
    assert s.oversize_policy is OversizePolicy.REJECT


def test_environment_for_carries_lists_of_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """A label set given inline (lists of tables) survives the trip through variables."""
    labels = [
        {"name": "spam", "description": "unwanted ads", "examples": ["WIN a prize", "cheap"]},
        {"name": "ham", "examples": ["see you at 5", 'she said "hi"']},
    ]
    values = {
        "analysis": {"namespaces": {"sms": {"classify": {"labels": labels, "top_k": 1}}}},
        "batch": {"linger_ms": 7},
    }
    for name, value in environment_for(values).items():
        monkeypatch.setenv(name, value)
    s = load_settings()
    got = s.analysis.spec.namespaces["sms"].classify
    assert got is not None
    assert [(label.name, label.examples) for label in got.labels] == [
        ("spam", ["WIN a prize", "cheap"]),
        ("ham", ["see you at 5", 'she said "hi"']),
    ]
    assert s.batch.linger_ms == 7


def test_invalid_env_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDDING_WORKER_BATCH__LINGER_MS", "-1")
    with pytest.raises(ConfigError, match="EMBEDDING_WORKER_BATCH__LINGER_MS"):
        load_settings()


TOML = """
default_namespace = "from-file"
log_level = "DEBUG"

[kafka]
bootstrap_servers = "file-host:9092"
group_id = "file-group"

[provider]
kind = "dashscope"
api_key = "sk-file-key"
dimension = 512
"""


def test_toml_file_via_argument(tmp_path: Path) -> None:
    path = tmp_path / "worker.toml"
    path.write_text(TOML)
    s = load_settings(path)
    assert s.default_namespace == "from-file"
    assert s.log_level == "debug"
    assert (s.kafka.bootstrap_servers, s.kafka.group_id) == ("file-host:9092", "file-group")
    assert s.provider.kind is ProviderKind.DASHSCOPE and s.provider.dimension == 512


def test_env_overrides_the_file_field_by_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "worker.toml"
    path.write_text(TOML)
    monkeypatch.setenv("EMBEDDING_WORKER_KAFKA__GROUP_ID", "env-group")
    monkeypatch.setenv("EMBEDDING_WORKER_DEFAULT_NAMESPACE", "from-env")
    s = load_settings(str(path))
    assert s.kafka.group_id == "env-group"
    assert s.kafka.bootstrap_servers == "file-host:9092"  # merged, not replaced
    assert s.default_namespace == "from-env"
    # And explicit overrides beat both.
    assert load_settings(path, default_namespace="explicit").default_namespace == "explicit"


def test_config_file_from_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "worker.toml"
    path.write_text(TOML)
    monkeypatch.setenv("EMBEDDING_WORKER_CONFIG", str(path))
    assert load_settings().default_namespace == "from-file"


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(missing)


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[kafka\ngroup_id = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(path)


def test_unknown_top_level_field_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="no_such_field"):
        load_settings(no_such_field=1)
    path = tmp_path / "typo.toml"
    path.write_text('default_namespaces = "x"\n')
    with pytest.raises(ConfigError, match="default_namespaces"):
        load_settings(path)


@pytest.mark.parametrize("via", ["argument", "toml", "env"])
def test_unknown_nested_field_is_refused(
    via: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A typo'd key (bootstrap_server without the final s) must not silently fall back to
    # the default broker.
    path: Path | None = None
    overrides: dict[str, object] = {}
    if via == "argument":
        overrides["kafka"] = {"bootstrap_server": "x:1"}
    elif via == "toml":
        path = tmp_path / "typo.toml"
        path.write_text('[kafka]\nbootstrap_server = "x:1"\n')
    else:
        monkeypatch.setenv("EMBEDDING_WORKER_KAFKA__BOOTSTRAP_SERVER", "x:1")
    with pytest.raises(ConfigError, match="bootstrap_server"):
        load_settings(path, **overrides)


@pytest.mark.parametrize("via", ["argument", "dashscope-env", "provider-env"])
def test_api_key_never_appears_in_repr_or_json(via: str, monkeypatch: pytest.MonkeyPatch) -> None:
    provider: dict[str, object] = {"kind": "dashscope"}
    if via == "argument":
        provider["api_key"] = SECRET
    elif via == "dashscope-env":
        monkeypatch.setenv("DASHSCOPE_API_KEY", SECRET)
    else:
        monkeypatch.setenv("EMBEDDING_WORKER_PROVIDER__API_KEY", SECRET)
    s = load_settings(provider=provider)
    assert s.provider.api_key is not None
    assert s.provider.api_key.get_secret_value() == SECRET  # it did arrive
    for text in (repr(s), str(s), s.model_dump_json(), str(s.model_dump()), repr(s.provider)):
        assert SECRET not in text


def test_settings_is_the_class_load_settings_builds() -> None:
    assert isinstance(load_settings(), Settings)


DSN_SECRET = "pw-Zq7xK93secret"


@pytest.mark.parametrize(
    ("dsn", "reason"),
    [
        (f"postgresql://app:{DSN_SECRET}@db:54x2/app", "not a number"),
        (f"postgresql://app:{DSN_SECRET}@db:5432,db2:x/app", "not a number"),
        (f"postgresql://app:{DSN_SECRET}@db:99999/app", "99999 is out of range"),
        (f"postgresql://app:{DSN_SECRET}@/app?host=db&port=0", "0 is out of range"),
        (f"postgres+asyncpg://app:{DSN_SECRET}@db/app", "postgresql://"),
        (f"db:5432/app?password={DSN_SECRET}", "postgresql://"),
        (f"host=db dbname=app password={DSN_SECRET}", "URI form"),
        (f"postgresql://app:{DSN_SECRET}@db/app?sslmode=true", "sslmode"),
        (f"postgresql://app:{DSN_SECRET}@db/app?keepalives=1&sslmode=require", "keepalives"),
        (f"postgresql://app:{DSN_SECRET}@db/app?target_session_attrs=any-old", "target_session"),
        (f"postgresql://app:{DSN_SECRET}@db/app?sslmode", "key=value"),
        (f"postgresql://app:{DSN_SECRET}@@db/app", "%40"),
        (f"postgresql://app:{DSN_SECRET}@db/app?sslmode=require&sslcert=/no/cert.pem", "file"),
        (f"postgresql://app:{DSN_SECRET}@db/app\n", "white space"),
    ],
)
def test_malformed_dsn_is_refused_without_its_password(dsn: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(postgres={"dsn": dsn})
    message = str(err.value)
    assert "postgres.dsn (EMBEDDING_WORKER_POSTGRES__DSN)" in message
    assert reason in message
    assert DSN_SECRET not in message


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://postgres@localhost:5432/postgres",
        f"postgres://app:{DSN_SECRET}@db.internal/app?sslmode=require&application_name=w",
        "postgresql://app@db1:5432,db2:5433/app?target_session_attrs=read-write",
        "postgresql://app@[::1]:5432/app",
        "postgresql:///app?host=/var/run/postgresql",
        "postgresql://app:p%40ss@db/app",  # an encoded '@'
    ],
)
def test_well_formed_dsn_is_accepted(dsn: str) -> None:
    assert load_settings(postgres={"dsn": dsn}).postgres.dsn.get_secret_value() == dsn


@pytest.mark.parametrize(
    "url", ["localhost:8000/v1", "ftp://h/v1", "http://", "https://:80/v1", "http://h:99999/v1"]
)
def test_provider_base_url_must_be_http_with_a_host(url: str) -> None:
    with pytest.raises(ConfigError, match=r"provider\.base_url .*http"):
        load_settings(provider={"kind": "openai", "api_key": SECRET, "base_url": url})


@pytest.mark.parametrize(
    ("servers", "reason"),
    [
        ("kafka:abc", "not a number"),
        ("kafka:99999", "1-65535"),
        ("kafka://broker:9092", "not host:port"),
        ("b1:9092,", "not host:port"),
        ("", "not host:port"),
    ],
)
def test_malformed_bootstrap_servers_are_refused(servers: str, reason: str) -> None:
    with pytest.raises(ConfigError, match="EMBEDDING_WORKER_KAFKA__BOOTSTRAP_SERVERS") as err:
        load_settings(kafka={"bootstrap_servers": servers})
    assert reason in str(err.value)


@pytest.mark.parametrize("servers", ["b1:9092,b2:9093", "[::1]:9092", "broker"])
def test_well_formed_bootstrap_servers_are_accepted(servers: str) -> None:
    assert load_settings(kafka={"bootstrap_servers": servers}).kafka.bootstrap_servers == servers


KAFKA_ENV = "kafka (EMBEDDING_WORKER_KAFKA)"


@pytest.mark.parametrize(
    ("kafka", "named", "reason"),
    [
        ({"security_protocol": "SASL_SSL", "sasl_password": "pw-secret"}, KAFKA_ENV, "needs"),
        ({"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN"}, KAFKA_ENV, "needs"),
        ({"sasl_mechanism": "SCRAM-SHA-512"}, KAFKA_ENV, "use SASL_SSL"),
        (
            {"security_protocol": "SSL", "ssl_cafile": "/no/such/ca.pem"},
            "kafka.ssl_cafile (EMBEDDING_WORKER_KAFKA__SSL_CAFILE)",
            "cannot read /no/such/ca.pem",
        ),
    ],
)
def test_incomplete_sasl_or_unreadable_tls_files_are_refused(
    kafka: dict[str, str], named: str, reason: str
) -> None:
    """At start: aiokafka would raise a traceback from its constructor or first connection."""
    with pytest.raises(ConfigError) as err:
        load_settings(kafka=kafka)
    assert named in str(err.value) and reason in str(err.value)
    assert "pw-secret" not in str(err.value)


def test_a_tls_file_that_is_not_pem_is_a_configuration_error(tmp_path: Path) -> None:
    from worker.kafka.clients import ssl_context

    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    settings = load_settings(kafka={"security_protocol": "SSL", "ssl_cafile": str(bad)})
    with pytest.raises(ConfigError, match="not a usable PEM certificate"):
        ssl_context(settings.kafka)
