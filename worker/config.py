"""One typed settings tree, from environment variables and an optional TOML file.

Environment variables use the prefix ``EMBEDDING_WORKER_`` and ``__`` between levels
(``EMBEDDING_WORKER_KAFKA__BOOTSTRAP_SERVERS``); the API key may also come from the
provider's conventional ``DASHSCOPE_API_KEY``. A file named by ``EMBEDDING_WORKER_CONFIG``
(or ``--config``) supplies defaults that the environment overrides.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import tomllib
from contextvars import ContextVar
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from aiokafka.conn import collect_hosts
from pydantic import (
    AliasChoices,
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from worker.analysis.config import (
    AnalysisFile,
    AnalysisFileError,
    NamespaceAnalysis,
    finish,
    load_analysis,
)
from worker.dsn import dsn_problem


class ConfigError(Exception):
    """Invalid configuration: the worker refuses to start and says why."""


class ProviderKind(StrEnum):
    LOCAL = "local"
    DASHSCOPE = "dashscope"
    OPENAI = "openai"
    # DashScope's multimodal endpoint: events with images or a video (docs/multimodal.md).
    DASHSCOPE_MULTIMODAL = "dashscope-multimodal"


class OutputType(StrEnum):
    """What the provider returns per text: the dense vector, or also a sparse lexical one
    (stored beside it; `search --mode sparse`). Only DashScope's native API has sparse."""

    DENSE = "dense"
    DENSE_SPARSE = "dense&sparse"


class LocalModel(StrEnum):
    USE = "use-multilingual-v3"
    E5 = "multilingual-e5-small"


class OversizePolicy(StrEnum):
    TRUNCATE = "truncate"
    REJECT = "reject"
    # Split into overlapping chunks of `chunking.max_tokens`, each its own row (README).
    CHUNK = "chunk"


DASHSCOPE_DIMENSIONS = (2048, 1536, 1024, 768, 512, 256, 128, 64)
LOCAL_DIMENSIONS = {LocalModel.USE: 512, LocalModel.E5: 384}
LOCAL_MAX_CONCURRENCY = 4
# Requests in flight when the AIMD limit starts (the fixed maximum before it could grow):
# 6,000 QPM (100/s, DashScope's v3 page) at ~150 ms is 15.
INITIAL_CONCURRENCY = 16
# The AIMD ceiling when neither max_concurrency nor a quota is set: 1,280 requests/s at 100
# ms (12,800 texts/s at DashScope's 10 per request, 41,000 at 32), more than a quota or one
# embedding server takes. Each request in flight holds a kept connection (~100 kB with
# aiohttp): at 256 the backlog test's resident memory came within 2-4 MB of its 160 MB bound.
AUTO_MAX_CONCURRENCY = 128
# DashScope's texts per request (worker/embedding/providers/dashscope.py MAX_TEXTS), for the
# validator that refuses more at start: not imported, as that module imports this one.
DASHSCOPE_TEXTS_LIMIT = 10
DEFAULT_URLS = {
    ProviderKind.DASHSCOPE: "https://dashscope-intl.aliyuncs.com/api/v1",
    ProviderKind.DASHSCOPE_MULTIMODAL: "https://dashscope-intl.aliyuncs.com/api/v1",
    ProviderKind.OPENAI: "https://dashscope-intl.aliyuncs.com/compatible-mode/v1",
}


@dataclass(frozen=True, slots=True)
class MultimodalModel:
    """A multimodal model's fixed dimension and per-request limits (the vendor's table)."""

    dimension: int
    max_text_tokens: int
    max_images: int
    max_image_bytes: int = 3 * 1024 * 1024
    max_video_bytes: int = 10 * 1024 * 1024


MULTIMODAL_MODELS = {
    "tongyi-embedding-vision-plus": MultimodalModel(1152, 1024, 8),
    "tongyi-embedding-vision-flash": MultimodalModel(768, 1024, 8),
    "multimodal-embedding-v1": MultimodalModel(1024, 512, 1),
}


_HTTP_URL = TypeAdapter(AnyHttpUrl)


class KafkaSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bootstrap_servers: str = "localhost:9092"
    group_id: str = "embedding-worker"
    client_id: str = "embedding-worker"
    input_topic: str = "content.events"
    dlq_topic: str = "content.events.dlq"
    # The largest dead-letter record (JSON envelope, key, framing) the DLQ topic takes: under
    # Kafka's 1 MiB defaults (broker message.max.bytes, aiokafka max_request_size). Copies of
    # big records are cut to fit (worker/envelope.py); raise it with the topic's limit.
    dlq_max_message_bytes: int = Field(default=1_000_000, ge=65_536)
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    session_timeout_ms: int = Field(default=10_000, ge=1_000)
    heartbeat_interval_ms: int = Field(default=3_000, ge=100)
    # The longest the main loop may go without a poll before the group takes its partitions
    # (a Postgres or schema-registry outage holds the loop); it rejoins at its next poll.
    max_poll_interval_ms: int = Field(default=300_000, ge=1_000)
    max_poll_records: int = Field(default=500, ge=1)
    # How long the broker may hold a fetch that has no data yet; part of every event's
    # latency on brokers that hold it whole (the embedded stack sets less), see kafka.py.
    fetch_max_wait_ms: int = Field(default=100, ge=0)
    # What one fetch may buffer (per partition / in all): part of the worker's memory bound.
    max_partition_fetch_bytes: int = Field(default=1_048_576, ge=1024)
    fetch_max_bytes: int = Field(default=16_777_216, ge=1024)
    # Results and dead letters: a retried produce is not written twice (needs a broker with
    # the idempotent producer: Apache Kafka 0.11+, Redpanda, MSK; the embedded Tansu has not).
    idempotent_producer: bool = True
    # Records of aborted upstream transactions are never read (nor those of open ones yet).
    isolation_level: Literal["read_committed", "read_uncommitted"] = "read_committed"
    # Passed through to aiokafka for real clusters.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    @field_validator("ssl_cafile", "ssl_certfile", "ssl_keyfile")
    @classmethod
    def _readable(cls, value: str | None) -> str | None:
        """At start, not at the first connection (where it was a traceback)."""
        if value is not None:
            try:
                Path(value).read_bytes()
            except OSError as exc:
                raise ValueError(f"cannot read {value}: {exc.strerror or exc}") from None
        return value

    @model_validator(mode="after")
    def _sasl_complete(self) -> KafkaSettings:
        """SASL needs a mechanism, a user and a password, and a SASL protocol to use them."""
        sasl = self.security_protocol.startswith("SASL_")
        if sasl and (self.sasl_mechanism is None or not self.sasl_username or not self._password()):
            raise ValueError(
                f"security_protocol={self.security_protocol} needs sasl_mechanism, "
                "sasl_username and sasl_password"
            )
        if not sasl and self.sasl_mechanism is not None:
            raise ValueError(
                f"sasl_mechanism={self.sasl_mechanism} is set but security_protocol is "
                f"{self.security_protocol}: use SASL_SSL (or SASL_PLAINTEXT)"
            )
        return self

    def _password(self) -> str:
        return "" if self.sasl_password is None else self.sasl_password.get_secret_value()

    @field_validator("bootstrap_servers")
    @classmethod
    def _host_ports(cls, value: str) -> str:
        """``host:port[,host:port]`` as aiokafka reads it: a typo is refused at start, where
        a client would wait forever for a broker that cannot answer (or raise a traceback)."""
        for server in value.split(","):
            if not server.strip() or "://" in server or "/" in server:
                raise ValueError(f"{server.strip()!r} is not host:port (host:port,host:port...)")
            try:
                [(host, port, _)] = collect_hosts(server)
            except ValueError:
                raise ValueError(f"{server.strip()!r}: the port is not a number") from None
            if not host or not 0 < port < 65536:
                raise ValueError(f"{server.strip()!r} is not host:port with a port in 1-65535")
        return value


class PostgresSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # libpq URI; `sslmode` and the rest of its query string pass through to asyncpg.
    dsn: SecretStr = SecretStr("postgresql://postgres@localhost:5432/postgres")
    pool_min_size: int = Field(default=1, ge=1)
    pool_max_size: int = Field(default=4, ge=1)

    @field_validator("dsn")
    @classmethod
    def _readable_dsn(cls, value: SecretStr) -> SecretStr:
        """Refused at start for every command, not at the first connection (see dsn.py)."""
        problem = dsn_problem(value.get_secret_value())
        if problem is not None:
            raise ValueError(problem)
        return value


class ProviderSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: ProviderKind = ProviderKind.LOCAL
    # Model name sent to HTTP providers; for `local`, which bundled model to run.
    model: str | None = None
    dimension: int | None = Field(default=None, ge=1)
    base_url: str | None = None
    api_key: SecretStr | None = None
    # Texts per request; None: the provider's own (its module's MAX_TEXTS: DashScope 10,
    # another OpenAI-compatible server 32, local 64). A server that answers "too many
    # inputs" lowers it for the run (worker/embedding/stage.py).
    max_texts_per_request: int | None = Field(default=None, ge=1)
    max_tokens_per_text: int = Field(default=8192, ge=1)
    max_tokens_per_request: int = Field(default=80_000, ge=1)
    timeout_s: float = Field(default=30.0, gt=0)
    # Most requests in flight. Adaptive (worker.embedding.concurrency): the limit starts at
    # INITIAL_CONCURRENCY, grows while latency rather than errors is the bound and halves on
    # 429s/timeouts. None: AUTO_MAX_CONCURRENCY, lowered to what the quota can keep busy
    # at the observed latency when rpm/tpm are set. The local model computes one batch at a
    # time: it defaults to 4 (enough to overlap).
    max_concurrency: int | None = Field(default=None, ge=1)
    min_concurrency: int = Field(default=1, ge=1)
    # Client-side quotas, smoothed per second like the provider's; None = unlimited.
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    # None: retry transient errors without limit (backpressure holds the rest).
    max_retries: int | None = Field(default=None, ge=0)
    backoff_initial_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=30.0, gt=0)
    # Circuit breaker: this many consecutive 5xx/timeouts/resets pause requests for cooldown_s.
    breaker_failures: int = Field(default=5, ge=1)
    breaker_cooldown_s: float = Field(default=10.0, gt=0)
    # Rejected key / account (401, 403): "wait" holds the work and re-tries every auth_retry_s
    # (readiness reports the fault); "exit" stops the worker (exit code 4).
    on_auth_fault: Literal["wait", "exit"] = "wait"
    auth_retry_s: float = Field(default=30.0, gt=0)
    # DashScope native only.
    instruct: str | None = None
    output_type: OutputType = OutputType.DENSE
    # OpenAI dialect: base64 is far cheaper to decode; some servers only speak float.
    encoding_format: Literal["base64", "float"] = "base64"
    send_dimensions: bool = True
    # Local model: BLAS threads of its forward pass, in its own process. None: all but one of
    # the CPUs this process may use, a container's CPU limit counted (see
    # worker/embedding/providers/local.py, ``model_threads``).
    local_threads: int | None = Field(default=None, ge=1)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        """An http(s) URL with a host, or the first request fails with an obscure error."""
        if value is not None:
            try:
                _HTTP_URL.validate_python(value)
            except ValidationError as exc:
                reason = exc.errors()[0]["msg"]
                raise ValueError(
                    f"must be an http:// or https:// URL with a host ({reason})"
                ) from None
        return value

    @model_validator(mode="after")
    def _sparse_needs_native(self) -> ProviderSettings:
        if self.output_type is OutputType.DENSE_SPARSE and self.kind is not ProviderKind.DASHSCOPE:
            raise ValueError(
                f"provider.output_type 'dense&sparse' needs provider.kind 'dashscope' (its native "
                f"API is the only one with sparse vectors); provider.kind {self.kind.value!r} "
                "returns dense vectors only: set provider.output_type = 'dense' (lexical and "
                "hybrid search work on every provider)"
            )
        return self

    @property
    def sparse(self) -> bool:
        """Whether the provider returns a sparse vector beside each dense one."""
        return self.output_type is OutputType.DENSE_SPARSE

    @model_validator(mode="after")
    def _concurrency_bounds(self) -> ProviderSettings:
        if self.max_concurrency is not None and self.min_concurrency > self.max_concurrency:
            raise ValueError(
                f"provider.min_concurrency ({self.min_concurrency}) is above "
                f"provider.max_concurrency ({self.max_concurrency})"
            )
        return self

    @property
    def concurrency_ceiling(self) -> int:
        """The most requests ever in flight (the AIMD limit's hard ceiling)."""
        return self.max_concurrency or AUTO_MAX_CONCURRENCY

    @property
    def model_name(self) -> str:
        assert self.model is not None  # filled by Settings validation
        return self.model

    @property
    def dim(self) -> int:
        assert self.dimension is not None  # filled by Settings validation
        return self.dimension


class BatchSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    linger_ms: int = Field(default=50, ge=0)
    # Events held by the pipeline (fetched, not yet stored) before partitions are paused.
    max_in_flight: int = Field(default=2_000, ge=1)
    # Most rows per Postgres transaction (one transaction also stores the offsets). The
    # writer does not linger: it writes what is ready, and rows that arrive meanwhile wait for
    # the next transaction, so transactions grow with the load.
    write_max_rows: int = Field(default=500, ge=1)
    # Writers, each on its own connection, for disjoint sets of partitions (partition modulo
    # writers): an id stays in one partition, so per-id order holds, and each transaction
    # stores the offsets of its own partitions. With an HNSW index Postgres's index
    # maintenance bounds one writer; two share it out over two cores. One when the analysis
    # runs (its state is kept in stream order per namespace).
    writers: int = Field(default=2, ge=1, le=16)


class ChunkingSettings(BaseModel):
    """The chunks of ``oversize_policy = chunk`` (worker/chunking.py): a text of more
    tokens than ``max_tokens`` (as worker/tokens.py estimates them, capped at
    ``provider.max_tokens_per_text``) is split into chunks of at most that many, each
    sharing up to ``overlap_tokens`` with the one before."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(default=256, ge=16)
    overlap_tokens: int = Field(default=32, ge=0)

    @model_validator(mode="after")
    def _overlap_below_size(self) -> ChunkingSettings:
        if self.overlap_tokens >= self.max_tokens:
            raise ValueError("chunking.overlap_tokens must be below chunking.max_tokens")
        return self


class HttpSettings(BaseModel):
    """The probe and metrics port (/healthz, /readyz, /metrics)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=0, le=65535)


class TracingSettings(BaseModel):
    """OpenTelemetry traces over OTLP/HTTP (worker.ops.tracing); needs the ``tracing`` extra.

    Unset, the endpoint and the sampling are the SDK's, from the standard ``OTEL_*`` variables
    (``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, ``OTEL_TRACES_SAMPLER``, ...)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    # The OTLP/HTTP traces URL, e.g. http://otel-collector:4318/v1/traces.
    endpoint: str | None = None
    # Of the traces started here; an event's sampled traceparent is followed either way.
    sample_ratio: float | None = Field(default=None, ge=0.0, le=1.0)


class SearchSettings(BaseModel):
    """The read side's lexical and hybrid modes (worker/read/search.py, docs/retrieval.md)."""

    model_config = ConfigDict(extra="forbid")

    # Postgres text search configuration of lexical search, fixed when migration 0006
    # is applied (like the dimension). `simple` lowercases and splits, for any language, and
    # keeps SKUs and log tokens as written; `english` stems and drops stop words.
    text_search_config: str = Field(
        default="simple", pattern=r"^([a-z_][a-z0-9_]*\.)?[a-z_][a-z0-9_]*$"
    )
    # Reciprocal rank fusion: score = sum over the lists of 1 / (rrf_k + rank).
    rrf_k: int = Field(default=60, ge=1)
    # Hits taken from each list before fusing (at least k).
    candidates: int = Field(default=100, ge=1)


class AnalysisSettings(BaseModel):
    """Classification, moderation and anomaly results (off unless a namespace is configured).

    The per-namespace rules come from ``file`` (a TOML file of their own) or inline from
    ``namespaces``, not both.
    """

    model_config = ConfigDict(extra="forbid")

    file: Path | None = None
    namespaces: dict[str, NamespaceAnalysis] = Field(default_factory=dict)
    classifications_topic: str = "content.classifications"
    anomalies_topic: str = "content.anomalies"
    # "json": each result as its own JSON object; "cloudevents": the same object as the
    # `data` of a CloudEvent in structured mode (application/cloudevents+json), for
    # consumers that route by CloudEvents attributes (Knative, Event Grid, Dapr).
    results_format: Literal["json", "cloudevents"] = "json"
    # Moderation decisions ({"id", "label", "namespace"?}) that add labeled examples; off
    # unless set. Bad ones go to their own dead-letter topic, replayable to this one.
    decisions_topic: str | None = None
    decisions_dlq_topic: str = "content.decisions.dlq"
    # How often a replica looks for decisions stored by others (and, at most, rebuilds).
    decisions_refresh_s: float = Field(default=5.0, gt=0)
    # A decision for an id not stored yet is looked up again until it is this old.
    decisions_grace_s: float = Field(default=5.0, ge=0)

    @cached_property
    def spec(self) -> AnalysisFile:
        if self.file is None:
            return finish(AnalysisFile(namespaces=self.namespaces), Path.cwd(), "analysis")
        return load_analysis(self.file)

    @model_validator(mode="after")
    def _load(self) -> AnalysisSettings:
        if self.file is not None and self.namespaces:
            raise ValueError("set analysis.file or analysis.namespaces, not both")
        try:
            _ = self.spec  # refuse a broken file at start, with the file's own message
        except AnalysisFileError as exc:
            raise ValueError(str(exc)) from None
        return self


class RecommendSettings(BaseModel):
    """Recommendation from a stream of interactions (docs/recommend.md); off unless a topic
    is set. Each (namespace, user) keeps a time-decayed weighted mean of the vectors of the
    items it interacted with."""

    model_config = ConfigDict(extra="forbid")

    # Interactions ({"user", "item", "weight"?, "time"?, "namespace"?}); off unless set. Bad
    # ones go to their own dead-letter topic, replayable to this one.
    interactions_topic: str | None = None
    interactions_dlq_topic: str = "content.interactions.dlq"
    # An interaction counts half as much as one this much later: a week keeps a profile on
    # what a user read lately while a few quiet days do not erase it.
    half_life_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    # An interaction with an item not stored yet is looked up again until it is this old.
    grace_s: float = Field(default=5.0, ge=0)
    # Items remembered per user (the latest), left out of `recommend --user`.
    seen_max: int = Field(default=1_000, ge=0)


class ReembedSettings(BaseModel):
    """What the running worker does for re-embed targets (docs/reembed.md, Dual write)."""

    model_config = ConfigDict(extra="forbid")

    # Embed each stored micro-batch with every target not yet switched too, and write it
    # into the target's table in the transaction of the rows and offsets: the switch then
    # has (nearly) nothing left to embed under its lock. Every request is doubled while on.
    dual_write: bool = False
    # How often the worker looks for targets started, switched or dropped by the CLI.
    dual_write_refresh_s: float = Field(default=10.0, gt=0)
    # The longest a micro-batch waits for a target's embeddings (counted from the batch's
    # start, beside its own request); past it, the target's rows are left to the catch-up.
    dual_write_timeout_s: float = Field(default=10.0, gt=0)


class InputFormat(StrEnum):
    NATIVE = "native"  # the README's event contract
    CLOUDEVENTS = "cloudevents"  # structured (JSON) or binary (`ce_` headers) mode
    DEBEZIUM = "debezium"  # change events of the JSON converter, with or without schemas
    # The Confluent wire format (magic byte, schema id), schemas from input.registry_url.
    AVRO = "avro"
    JSONSCHEMA = "jsonschema"
    PROTOBUF = "protobuf"


# What each schema-registry format needs installed (the `registry` extra); grpc_tools
# compiles the .proto text that some registries answer (worker/pipeline/registry.py).
REGISTRY_FORMATS = {
    InputFormat.AVRO: ("fastavro",),
    InputFormat.JSONSCHEMA: ("jsonschema",),
    InputFormat.PROTOBUF: ("google.protobuf", "grpc_tools"),
}


class FieldMap(BaseModel):
    """Where the event's parts are in a record (README, Input formats): dotted paths in the
    row (the value; a CloudEvent's data; a Debezium event's row), or in the envelope when they
    start with `$` (`$subject`, `$source.table`). ``text`` may name several fields, joined
    by a blank line; ``metadata_fields`` are copied into the metadata by their last name."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(default="id", min_length=1)
    text: str | list[str] = "text"
    namespace: str | None = "namespace"
    metadata: str | None = "metadata"
    metadata_fields: list[str] = Field(default_factory=list)
    timestamp: str | None = "timestamp"
    op: str | None = "op"
    text_type: str | None = "text_type"

    @field_validator("namespace", "metadata", "timestamp", "op", "text_type", mode="before")
    @classmethod
    def _off(cls, value: Any) -> Any:
        """``""`` turns a part off (neither TOML nor an environment variable has null)."""
        return None if value == "" else value


class InputSettings(BaseModel):
    """The shape of the input topic's records."""

    model_config = ConfigDict(extra="forbid")

    format: InputFormat = InputFormat.NATIVE
    fields: FieldMap = FieldMap()
    # A registry speaking the Confluent REST API (avro, jsonschema and protobuf formats).
    registry_url: str | None = None
    registry_user: str | None = None
    registry_password: SecretStr | None = None
    registry_timeout_s: float = Field(default=5.0, gt=0)

    @model_validator(mode="after")
    def _registry(self) -> InputSettings:
        modules = REGISTRY_FORMATS.get(self.format)
        if modules is None:
            return self
        if not self.registry_url:
            raise ValueError(f"input.format {self.format.value!r} needs input.registry_url")
        if not all(map(_installed, modules)):
            raise ValueError(
                f"input.format {self.format.value!r} needs the `registry` extra "
                "(pip install 'embedding-worker[registry]')"
            )
        return self


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # `google` itself, for google.protobuf
        return False


class Settings(BaseSettings):
    """The whole configuration; see the README's table for every field."""

    model_config = SettingsConfigDict(
        env_prefix="EMBEDDING_WORKER_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    kafka: KafkaSettings = KafkaSettings()
    postgres: PostgresSettings = PostgresSettings()
    provider: ProviderSettings = ProviderSettings()
    batch: BatchSettings = BatchSettings()
    http: HttpSettings = HttpSettings()
    tracing: TracingSettings = TracingSettings()
    analysis: AnalysisSettings = AnalysisSettings()
    search: SearchSettings = SearchSettings()
    input: InputSettings = InputSettings()
    recommend: RecommendSettings = RecommendSettings()
    reembed: ReembedSettings = ReembedSettings()
    default_namespace: str = Field(default="default", min_length=1, max_length=200)
    oversize_policy: OversizePolicy = OversizePolicy.TRUNCATE
    chunking: ChunkingSettings = ChunkingSettings()
    max_metadata_bytes: int = Field(default=64_000, ge=1)
    # A version time (event `timestamp`, else the record's) further ahead than this of the
    # record's own time (or the worker's clock, if earlier) is dead-lettered: README, Ordering.
    max_clock_skew_s: float = Field(default=300.0, ge=0)
    log_level: str = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    dashscope_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("DASHSCOPE_API_KEY", "EMBEDDING_WORKER_DASHSCOPE_API_KEY"),
        exclude=True,
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _CONFIG_FILE.get()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.lower() not in {"debug", "info", "warning", "error"}:
            raise ValueError("must be one of debug, info, warning, error")
        return value.lower()

    @model_validator(mode="after")
    def _distinct_topics(self) -> Settings:
        """Writing results or dead letters to the input topic would feed them back in."""
        k, a = self.kafka, self.analysis
        outputs = {
            "kafka.dlq_topic": k.dlq_topic,
            "analysis.classifications_topic": a.classifications_topic,
            "analysis.anomalies_topic": a.anomalies_topic,
        }
        for name, topic in outputs.items():
            if topic == k.input_topic:
                raise ValueError(f"{name} must differ from kafka.input_topic ({topic!r})")
        if a.decisions_topic is not None:
            taken = {
                "kafka.input_topic": k.input_topic,
                **outputs,
                "analysis.decisions_dlq_topic": a.decisions_dlq_topic,
            }
            for name, topic in taken.items():
                if topic == a.decisions_topic:
                    raise ValueError(
                        f"analysis.decisions_topic must differ from {name} ({topic!r})"
                    )
            if a.decisions_dlq_topic == k.input_topic:
                raise ValueError(
                    f"analysis.decisions_dlq_topic must differ from kafka.input_topic "
                    f"({k.input_topic!r})"
                )
            if not a.spec.namespaces or not any(
                ns.classify is not None for ns in a.spec.namespaces.values()
            ):
                raise ValueError(
                    "analysis.decisions_topic needs a namespace with a `classify` label set "
                    "in the analysis file"
                )
        r = self.recommend
        if r.interactions_topic is not None:
            taken = {
                "kafka.input_topic": k.input_topic,
                **outputs,
                "recommend.interactions_dlq_topic": r.interactions_dlq_topic,
            }
            if a.decisions_topic is not None:
                taken |= {
                    "analysis.decisions_topic": a.decisions_topic,
                    "analysis.decisions_dlq_topic": a.decisions_dlq_topic,
                }
            for name, topic in taken.items():
                if topic == r.interactions_topic:
                    raise ValueError(
                        f"recommend.interactions_topic must differ from {name} ({topic!r})"
                    )
            if r.interactions_dlq_topic == k.input_topic:
                raise ValueError(
                    "recommend.interactions_dlq_topic must differ from kafka.input_topic "
                    f"({k.input_topic!r})"
                )
        return self

    @model_validator(mode="after")
    def _resolve_provider(self) -> Settings:
        p = self.provider
        if p.api_key is None and self.dashscope_api_key is not None:
            p.api_key = self.dashscope_api_key
        if p.kind is ProviderKind.LOCAL:
            try:
                local = LocalModel(p.model or LocalModel.USE)
            except ValueError:
                choices = ", ".join(m.value for m in LocalModel)
                raise ValueError(
                    f"provider.model {p.model!r} is not a bundled local model ({choices})"
                ) from None
            p.model = local.value
            native = LOCAL_DIMENSIONS[local]
            if p.dimension is not None and p.dimension != native:
                raise ValueError(
                    f"provider.dimension {p.dimension} does not match the local model "
                    f"{local.value}, which produces {native}-d vectors"
                )
            p.dimension = native
            if p.max_concurrency is None:
                p.max_concurrency = LOCAL_MAX_CONCURRENCY
            return self
        if p.kind is ProviderKind.DASHSCOPE_MULTIMODAL:
            _resolve_multimodal(p)
            if self.oversize_policy is OversizePolicy.CHUNK:
                raise ValueError(
                    "oversize_policy 'chunk' does not apply to provider.kind "
                    "'dashscope-multimodal' (one event is one request and one vector): use "
                    "truncate or reject"
                )
        p.model = p.model or "text-embedding-v4"
        p.dimension = p.dimension or 1024
        p.base_url = (p.base_url or DEFAULT_URLS[p.kind]).rstrip("/")
        if p.api_key is None or not p.api_key.get_secret_value():
            raise ValueError(
                f"provider {p.kind.value!r} needs an API key: set DASHSCOPE_API_KEY "
                "or EMBEDDING_WORKER_PROVIDER__API_KEY"
            )
        if p.kind is ProviderKind.DASHSCOPE:
            if p.dimension not in DASHSCOPE_DIMENSIONS:
                raise ValueError(
                    f"provider.dimension {p.dimension} is not offered by DashScope "
                    f"(one of {', '.join(map(str, DASHSCOPE_DIMENSIONS))})"
                )
            limit = DASHSCOPE_TEXTS_LIMIT
            if p.max_texts_per_request is not None and p.max_texts_per_request > limit:
                raise ValueError(
                    f"provider.max_texts_per_request is at most {limit} for DashScope "
                    "(a larger batch is a 400 that no retry fixes)"
                )
        return self

    @model_validator(mode="after")
    def _dual_write_scope(self) -> Settings:
        """Dual write embeds a row's stored text as the re-embed does, one row per event:
        chunked documents (several rows) and media are left to the re-embed's passes."""
        if not self.reembed.dual_write:
            return self
        if self.oversize_policy is OversizePolicy.CHUNK:
            raise ValueError(
                "reembed.dual_write does not apply to oversize_policy 'chunk' (a document's "
                "chunks are several rows): turn it off, the re-embed's passes fill the target"
            )
        if self.provider.kind is ProviderKind.DASHSCOPE_MULTIMODAL:
            raise ValueError(
                "reembed.dual_write does not apply to provider.kind 'dashscope-multimodal': "
                "turn it off, the re-embed's passes fill the target"
            )
        return self


def _resolve_multimodal(p: ProviderSettings) -> None:
    """The model fixes the dimension; its text limit caps ``max_tokens_per_text``."""
    name = p.model or "tongyi-embedding-vision-plus"
    model = MULTIMODAL_MODELS.get(name)
    if model is None:
        raise ValueError(
            f"provider.model {name!r} is not a DashScope multimodal model "
            f"({', '.join(MULTIMODAL_MODELS)})"
        )
    if p.dimension is not None and p.dimension != model.dimension:
        raise ValueError(
            f"provider.dimension {p.dimension} does not match {name}, which produces "
            f"{model.dimension}-d vectors"
        )
    p.model, p.dimension = name, model.dimension
    p.max_tokens_per_text = min(p.max_tokens_per_text, model.max_text_tokens)


_CONFIG_FILE: ContextVar[Path | None] = ContextVar("config_file", default=None)


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build and validate the settings, turning validation errors into one clear message.

    Precedence: explicit overrides > environment > config file > defaults.
    """
    raw = config_file or os.environ.get("EMBEDDING_WORKER_CONFIG")
    path = Path(raw) if raw else None
    if path is not None and not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    token = _CONFIG_FILE.set(path)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_explain(exc)) from None
    except SettingsError as exc:
        raise ConfigError(_explain_source(exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    finally:
        _CONFIG_FILE.reset(token)


def environment_for(values: dict[str, Any]) -> dict[str, str]:
    """The ``EMBEDDING_WORKER_*`` variables that express nested settings values, e.g. to
    start a worker process with the same configuration."""
    out: dict[str, str] = {}

    def flatten(prefix: str, node: dict[str, Any]) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                flatten(f"{prefix}{key.upper()}__", value)
            elif isinstance(value, list | tuple):  # complex values are read as JSON
                out[f"{prefix}{key.upper()}"] = json.dumps(value)
            elif value is not None:
                out[f"{prefix}{key.upper()}"] = str(value)

    flatten("EMBEDDING_WORKER_", values)
    return out


def _explain(exc: ValidationError) -> str:
    lines = ["invalid configuration:"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        env = "EMBEDDING_WORKER_" + "__".join(str(p) for p in err["loc"]).upper()
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  - {where} ({env}): {msg}" if err["loc"] else f"  - {msg}")
    return "\n".join(lines)


def _explain_source(exc: SettingsError) -> str:
    """A value pydantic-settings could not even parse: JSON for a nested setting that is not.

    Its message names only the top-level field ("kafka"); the variables that hold it are
    found again here, so the message names the one to fix (never its value: it may hold a
    password).
    """
    match = re.search(r'field "([^"]+)"', str(exc))
    field = match.group(1) if match else "settings"
    prefix = "EMBEDDING_WORKER_" + field.upper()
    culprits = sorted(
        name
        for name, value in os.environ.items()
        if (name.upper() == prefix or name.upper().startswith(prefix + "__"))
        and _not_json(name.upper() == prefix, value)
    )
    where = ", ".join(culprits) or f"{prefix} or {prefix}__*"
    if len(culprits) == 1:  # the nested setting itself: analysis.namespaces, not analysis
        field = culprits[0][len("EMBEDDING_WORKER_") :].lower().replace("__", ".")
    why = f": {exc.__cause__}" if exc.__cause__ is not None else ""
    return f"invalid configuration:\n  - {field} ({where}): not valid JSON{why}"


def _not_json(whole: bool, value: str) -> bool:
    """Whether pydantic-settings would have failed to decode ``value`` as JSON (it decodes a
    whole section, or a nested value that looks like an object or a list)."""
    if not whole and value.lstrip()[:1] not in ("{", "["):
        return False
    try:
        json.loads(value)
    except ValueError:
        return True
    return False
