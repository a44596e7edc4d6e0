"""Typed configuration: built-in defaults < YAML file < ``STREAMKD_`` env < ``--set``.

Every section is a frozen dataclass; :func:`load_config` merges the layers as
plain dicts, then builds the dataclasses once, checking every key and value.
Any problem raises :class:`ConfigError` naming the dotted key (the CLI turns
it into exit code 2).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import hashlib
import json
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

ENV_PREFIX = "STREAMKD_"
SECRET_KEYS = frozenset(
    {"kafka.sasl_plain_password", "kafka.ssl_password", "kafka.sasl_oauth_token", "metrics.snapshot_token"}
)


class ConfigError(ValueError):
    """A configuration problem; ``key`` is the dotted path of the offending setting."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap_servers: str = "127.0.0.1:9092"
    topic: str = "images"
    group_id: str = "streamkd"
    dlq_topic: str | None = None
    client_id: str = "streamkd"
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    consumers: int = 1  # consumer threads, each owning a share of the partitions
    queue_records: int = 4096  # bound of the consumer -> decoder queue
    max_poll_records: int = 2000
    fetch_max_bytes: int = 52_428_800
    max_partition_fetch_bytes: int = 10_485_760
    request_timeout_ms: int = 30_000
    reconnect_backoff_max_ms: int = 10_000
    metadata_refresh_s: float = 30.0  # how often new partitions of the topic are picked up
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI"] | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: str | None = None
    ssl_check_hostname: bool = True
    # Poll errors (codec, authorization, a deleted topic) for this long without a record delivered:
    # /readyz fails. The cause is logged as an ERROR at least once a minute while they last.
    unhealthy_after_s: float = 60.0
    # The dead-letter producer: compression, how long a send may wait for metadata or buffer room
    # (on its own thread, never on the training path), and how many unacknowledged dead letters
    # are held before intake pauses (and /readyz fails) until the DLQ accepts them again.
    dlq_compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "none"
    dlq_max_block_ms: int = 5000
    dlq_max_pending: int = 1000
    dlq_max_pending_bytes: int = 64 << 20
    # Any other kafka-python consumer setting, checked against its own names.
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InputConfig:
    max_bytes: int = 8 << 20
    max_pixels: int = 4_194_304  # 2048×2048; bounds the CPU a tiny hostile JPEG header can cost
    max_images: int = 1024
    # uint8 bytes of one record's images once decoded and brought to the teacher's size (a float32
    # copy is four times this): bigger records are rejected as too_large.
    max_decoded_bytes: int = 64 << 20
    decode_workers: int = 2
    max_wait_ms: int = 200  # a partial batch is trained after this long without new records
    gpu_decode: bool = True  # on CUDA, decode JPEG with nvJPEG (batched, on a side stream)


@dataclass(frozen=True)
class TeacherConfig:
    model: str = "streamkd:fmnist_cnn"
    weights: str | None = None  # None: the shipped weights for streamkd:fmnist_cnn, else random init
    input_size: tuple[int, int] = (28, 28)
    channels: int = 1
    mean: tuple[float, ...] = (0.2860,)
    std: tuple[float, ...] = (0.3530,)
    num_classes: int | None = None  # None: read from the model's output
    # auto: bf16 where the hardware computes it natively (CUDA; CPUs with AVX512-BF16 or AMX),
    # fp16 on CUDA GPUs without bf16, fp32 elsewhere. The teacher only infers, so no loss scaling is needed.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # The teacher budget: the share of samples the teacher labels (1.0: all). The student scores every
    # sample; the least certain ones go to the teacher, plus a random share that keeps the agreement
    # estimate unbiased. "adaptive": a controller moves it between budget_floor and budget_ceiling.
    budget: float | Literal["adaptive"] = 1.0
    budget_floor: float = 0.25  # below about a quarter, one pass loses accuracy (README "Results")
    budget_ceiling: float = 1.0
    random_share: float = 0.1  # of every batch, labelled whatever the budget (the unbiased estimate)
    # adaptive: the budget rises while the recent random-share agreement is more than agreement_drop below
    # the level the student has held (and below target_agreement, when set), and falls otherwise
    agreement_drop: float = 0.05
    target_agreement: float | None = None


@dataclass(frozen=True)
class StudentConfig:
    model: str = "streamkd:lenet5"
    num_classes: int | None = None  # None: the teacher's
    input_size: tuple[int, int] | None = None  # None: the teacher's
    channels: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    init: str | None = None  # weights file to start from when no checkpoint exists


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 32  # small models learn most per image with small batches; GPUs want 256+
    temperature: float = 4.0
    alpha: float = 0.9
    loss: Literal["kl", "soft_ce"] = "kl"
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 3e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    warmup_steps: int = 0
    # Training steps per labelled batch; auto: round(1 / sqrt(teacher budget)), 1 at the full budget
    # (a low budget reads 1/budget batches of records per step; extra steps retrain the fresh rows with
    # new replayed samples).
    steps_per_batch: int | Literal["auto"] = "auto"
    grad_clip: float = 5.0  # max global grad norm; 0 disables
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # the student's; auto: bf16 on CUDA, fp32 on CPU
    channels_last: bool = True  # teacher and student memory format (oneDNN on CPU, tensor cores on CUDA)
    compile: bool = False
    prefetch_batches: int = 4
    max_consecutive_skips: int = 10  # then roll back to the last good checkpoint
    max_crashes: int = 3  # process crashes in a row while decoding or training a record, then it is dead-lettered
    agreement_window: int = 2000  # samples in the prequential window
    shutdown_grace_s: float = 30.0
    seed: int = 0


@dataclass(frozen=True)
class ReplayConfig:
    """Replay of teacher-labelled samples: each step trains on the fresh batch plus samples from a buffer."""

    enabled: bool = True
    capacity: int = 12000  # samples (uint8 image + fp16 teacher logits + label each)
    max_bytes: int = 64 << 20  # the buffer never holds more than this, whatever the capacity
    ratio: float = 1.0  # replayed samples per sample of a full batch, in a step
    recency_share: float = 0.25  # of the replayed samples, drawn from the most recent ones
    # Prioritized draws from the reservoir: probability ∝ (divergence from the teacher + 0.01) ** priority,
    # the divergence measured when the sample was last trained on; 0 draws uniformly.
    priority: float = 1.0
    # Balance the reservoir (class-balancing reservoir sampling) and its draws over the teacher's top-1 classes.
    balance: bool = False
    # Weight each step's rows so that its class mix (teacher top-1) is the stream's long-run mix, not the
    # current one: a stream whose classes come in turn then forgets less (learn/prior.py).
    reweight: bool = True


@dataclass(frozen=True)
class EmaConfig:
    """An exponential moving average of the student's weights, published in snapshots."""

    enabled: bool = True
    decay: float = 0.995


@dataclass(frozen=True)
class GateConfig:
    """Gated publishing: a candidate snapshot becomes LATEST only if it scores as well as the last one
    (within ``tolerance``) on a holdout of teacher-labelled samples that are never trained on."""

    enabled: bool = True
    holdout_share: float = 0.02  # of the stream, diverted into the holdout (not trained on)
    holdout_capacity: int = 1000  # samples
    tolerance: float = 0.01  # agreement (and accuracy) a candidate may lose against the published snapshot


@dataclass(frozen=True)
class DriftConfig:
    """Drift detection on the random share's agreement and the student's confidence, and the reaction."""

    enabled: bool = True
    detector: Literal["adwin", "page_hinkley"] = "adwin"
    lr_boost: float = 3.0  # learning-rate factor right after a drift, decaying back to 1
    boost_steps: int = 400  # steps over which the boost decays
    # Updates per labelled batch while the boost lasts (at least train.steps_per_batch's): the fresh rows of
    # the new regime are trained again with new replayed samples, so fewer records are needed to learn it.
    boost_updates: int = 8
    # While a boost after an input shift lasts, the replayed part of those extra updates comes this much from
    # the replay buffer's latest samples (the new regime); each batch's first update keeps the usual mix
    # (replay.recency_share), so the older content is still replayed once per batch.
    boost_recent_share: float = 1.0
    # Replay keeps its older content for this many samples after a drift (0: off). Freezing the reservoir
    # keeps the previous content out of it too: on a class-incremental stream it cost more than it saved.
    protect_samples: int = 0
    # The drifts that get the boost (lr_boost, boost_updates, the EMA following the student): "input_shift",
    # or "all". Every drift raises the teacher budget. After new classes what the student knows still holds
    # and the boost only speeds up forgetting it; after a label shift (the inputs look as usual, the teacher's
    # labels moved) the teacher itself may be wrong. learn/drift.py tells the kinds apart.
    boost_on: Literal["input_shift", "all"] = "input_shift"
    # The served EMA follows the student closely after a drift: its decay drops to ema_decay and rises
    # linearly back to ema.decay over ema_steps updates (ema_steps 0: off).
    ema_decay: float = 0.9
    ema_steps: int = 400


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str = "state/checkpoints"
    every_steps: int = 200
    every_seconds: float = 60.0
    keep: int = 3


@dataclass(frozen=True)
class SnapshotConfig:
    dir: str = "state/snapshots"
    every_steps: int = 500
    every_seconds: float = 300.0
    keep: int = 5
    formats: tuple[Literal["onnx", "torchscript", "pt2"], ...] = ()
    export_timeout_s: float = 600.0  # per snapshot, for the export process (all formats)
    export_threads: int = 1  # CPU threads of the export process (it also runs at a lower priority)
    triton_max_batch_size: int = 64  # config.pbtxt: the largest batch Triton may form
    triton_max_queue_delay_us: int = 100  # config.pbtxt: how long Triton may wait to fill a batch
    publish_to: str | None = None  # fsspec URL (s3://bucket/prefix, gs://..., file:///...) to upload to
    publish_options: Mapping[str, Any] = field(default_factory=dict)  # passed to the fsspec filesystem
    publish_backoff_max_s: float = 60.0  # longest wait between upload retries


@dataclass(frozen=True)
class MetricsConfig:
    host: str = "127.0.0.1"
    port: int = 9400
    snapshot_token: str | None = None  # bearer token required on /v1/snapshots when set
    max_connections: int = 64  # open HTTP connections; more are answered 503 and closed
    request_timeout_s: float = 300.0  # longest one request may take, a snapshot download included


@dataclass(frozen=True)
class LoggingConfig:
    format: Literal["text", "json"] = "text"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    progress_every_s: float = 10.0


@dataclass(frozen=True)
class Config:
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    input: InputConfig = field(default_factory=InputConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self, redact: bool = True) -> dict[str, Any]:
        """Plain dict of every setting; secrets replaced by ``"***"`` unless ``redact=False``."""
        out = _to_plain(dataclasses.asdict(self))
        if redact:
            for dotted in SECRET_KEYS:
                section, key = dotted.split(".")
                if out[section].get(key) is not None:
                    out[section][key] = "***"
            out["kafka"]["extra"] = {k: ("***" if _looks_secret(k) else v) for k, v in out["kafka"]["extra"].items()}
            out["snapshot"]["publish_options"] = _redact_tree(out["snapshot"]["publish_options"])
        return out

    def sha256(self) -> str:
        """Digest of the redacted config (stable key order): identifies a run's settings in manifests."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    # Student settings default to the teacher's.
    @property
    def student_input_size(self) -> tuple[int, int]:
        return self.student.input_size or self.teacher.input_size

    @property
    def student_channels(self) -> int:
        return self.student.channels or self.teacher.channels

    @property
    def student_mean(self) -> tuple[float, ...]:
        return self.student.mean or self.teacher.mean

    @property
    def student_std(self) -> tuple[float, ...]:
        return self.student.std or self.teacher.std


def _looks_secret(key: str) -> bool:
    return any(word in key.lower() for word in ("password", "secret", "token", "key"))


def _redact_tree(value: Any) -> Any:
    """Nested mapping with every secret-looking key's value replaced by ``"***"``."""
    if isinstance(value, Mapping):
        return {k: ("***" if _looks_secret(str(k)) else _redact_tree(v)) for k, v in value.items()}
    return value


def _to_plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------- loading


def load_config(
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Config:
    """Merge defaults < YAML at ``path`` < ``STREAMKD_*`` env < ``overrides`` (``a.b=yaml``), then validate."""
    merged: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError("", f"cannot read config file {path}: {e.strerror}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError("", f"{path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError("", f"{path} must hold a mapping of sections, got {type(data).__name__}")
        _deep_merge(merged, data)
    for dotted, value in env_overrides(os.environ if env is None else env):
        _set_dotted(merged, dotted, value)
    for item in overrides:
        dotted, sep, raw = item.partition("=")
        if not sep or not dotted.strip():
            shown = "an argument that names a secret" if _looks_secret(item) else repr(item)
            raise ConfigError(dotted.strip() if sep else "", f"--set expects KEY=VALUE, got {shown}")
        _set_dotted(merged, dotted.strip(), _parse_scalar(dotted.strip(), raw))
    _check_token_given(merged)
    cfg = _build(Config, merged, "")
    validate(cfg)
    return cfg


def env_overrides(environ: Mapping[str, str]) -> list[tuple[str, Any]]:
    """``STREAMKD_KAFKA__BOOTSTRAP_SERVERS=x`` -> ``("kafka.bootstrap_servers", "x")`` (values parsed as YAML)."""
    out = []
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue  # STREAMKD_DATA_DIR and friends are not config keys
        dotted = ".".join(part.lower() for part in name[len(ENV_PREFIX):].split("__"))
        out.append((dotted, _parse_scalar(dotted, raw)))
    return out


def _parse_scalar(key: str, raw: str) -> Any:
    """An env/--set value: YAML, except for secrets, which are taken exactly as typed
    (YAML would turn ``0123`` into 83, ``null``/``~`` into no value and cut ``abc #x`` at the ``#``)."""
    if key in SECRET_KEYS:
        return raw
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        if _is_secret_key(key):  # the parser's message quotes the text
            raise ConfigError(key, f"value is not valid YAML ({type(e).__name__})") from None
        raise ConfigError(key, f"value {raw!r} is not valid YAML: {e}") from None


def _is_secret_key(dotted: str) -> bool:
    """A key whose value must never appear in a message: the secret settings, and look-alikes (typos, extra)."""
    return dotted in SECRET_KEYS or _looks_secret(dotted.rsplit(".", 1)[-1])


def _check_token_given(merged: Mapping[str, Any]) -> None:
    """An explicitly empty or null token is a mistake (an unset variable?), never "no authentication":
    leaving the key out is how snapshots are served without a token."""
    metrics = merged.get("metrics")
    if isinstance(metrics, Mapping) and "snapshot_token" in metrics:
        value = metrics["snapshot_token"]
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ConfigError("metrics.snapshot_token", "is empty; set a token, or leave the key out to serve "
                                                        "snapshots without one")


def _deep_merge(dst: dict, src: Mapping) -> None:
    for k, v in src.items():
        if isinstance(v, Mapping) and isinstance(dst.get(k), dict) and k not in ("extra", "publish_options"):
            _deep_merge(dst[k], v)
        else:
            dst[k] = dict(v) if isinstance(v, Mapping) else v


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(".".join(parts[: i + 1]), "is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(prefix, f"expected a mapping, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(key, f"unknown key. Valid keys{' in ' + prefix if prefix else ''}: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name in data:
            key = f"{prefix}.{name}" if prefix else name
            kwargs[name] = _coerce(hints[name], data[name], key)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if key in SECRET_KEYS and value is not None and not isinstance(value, str):
        raise ConfigError(key, f"must be a string (quote it in YAML), got a {type(value).__name__}")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for alternative in inner[:-1]:  # e.g. a number or "adaptive": the first type that takes the value
            try:
                return _coerce(alternative, value, key)
            except ConfigError:
                pass
        return _coerce(inner[-1], value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"invalid value {_show(value, key)}. Valid: {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if tp is tuple[int, int] or args == (int, int):
            if isinstance(value, int) and not isinstance(value, bool):
                value = [value, value]  # input_size: 224 means 224×224
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                raise ConfigError(key, f"expected an int or [height, width], got {_show(value, key)}")
            return tuple(_coerce(int, v, key) for v in value)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(_coerce(args[0], v, key) for v in value)
    if origin in (Mapping, dict, collections.abc.Mapping) or tp is Mapping:
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a mapping, got {_show(value, key)}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true or false, got {_show(value, key)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected an integer, got {_show(value, key)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(key, f"expected a number, got {_show(value, key)}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(key, f"expected a string, got {_show(value, key)}")
    if tp is Any:
        return value
    raise ConfigError(key, f"unsupported setting type {tp}")  # pragma: no cover - a bug in this module


def _show(value: Any, key: str = "") -> str:
    if _is_secret_key(key):
        return f"a {type(value).__name__}"  # never the value itself
    return f"{value!r} ({type(value).__name__})"


# --------------------------------------------------------------------------- validation


def _positive(cfg: Any, section: str, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        v = getattr(getattr(cfg, section), name)
        if v is None:
            continue
        if v < 0 or (v == 0 and not allow_zero):
            raise ConfigError(f"{section}.{name}", f"must be {'>= 0' if allow_zero else '> 0'}, got {v}")


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express; raises ConfigError naming the key."""
    if not cfg.kafka.bootstrap_servers.strip():
        raise ConfigError("kafka.bootstrap_servers", "must not be empty (host:port[,host:port...])")
    if not cfg.kafka.topic:
        raise ConfigError("kafka.topic", "must not be empty")
    if cfg.kafka.dlq_topic is not None and cfg.kafka.dlq_topic == cfg.kafka.topic:
        raise ConfigError("kafka.dlq_topic", "must differ from kafka.topic")
    _positive(cfg, "kafka", "consumers", "queue_records", "max_poll_records", "fetch_max_bytes",
              "max_partition_fetch_bytes", "request_timeout_ms", "reconnect_backoff_max_ms", "metadata_refresh_s",
              "unhealthy_after_s", "dlq_max_block_ms", "dlq_max_pending", "dlq_max_pending_bytes")
    _check_kafka_extra(cfg.kafka.extra)
    if cfg.kafka.security_protocol.startswith("SASL") and cfg.kafka.sasl_mechanism is None:
        raise ConfigError("kafka.sasl_mechanism", f"required with security_protocol {cfg.kafka.security_protocol}")
    _positive(cfg, "input", "max_bytes", "max_pixels", "max_images", "max_decoded_bytes", "decode_workers")
    _positive(cfg, "input", "max_wait_ms", allow_zero=True)
    for section in ("teacher", "student"):
        sc = getattr(cfg, section)
        if section == "teacher" or sc.input_size is not None:
            size = sc.input_size
            if min(size) < 1 or max(size) > 4096:
                raise ConfigError(f"{section}.input_size", f"each side must be in 1..4096, got {list(size)}")
        if sc.channels is not None and sc.channels not in (1, 3):
            raise ConfigError(f"{section}.channels", f"invalid value {sc.channels}. Valid: 1, 3")
        if sc.num_classes is not None and sc.num_classes < 2:
            raise ConfigError(f"{section}.num_classes", f"must be >= 2, got {sc.num_classes}")
    for section, channels, mean, std in (
        ("teacher", cfg.teacher.channels, cfg.teacher.mean, cfg.teacher.std),
        ("student", cfg.student_channels, cfg.student_mean, cfg.student_std),
    ):
        for name, vals in (("mean", mean), ("std", std)):
            if len(vals) not in (1, channels):
                raise ConfigError(f"{section}.{name}", f"needs 1 or {channels} values (channels), got {len(vals)}")
        if any(s <= 0 for s in std):
            raise ConfigError(f"{section}.std", f"every value must be > 0, got {list(std)}")
    t = cfg.train
    _positive(cfg, "train", "batch_size", "temperature", "lr", "prefetch_batches", "max_consecutive_skips",
              "max_crashes", "agreement_window", "shutdown_grace_s")
    _positive(cfg, "train", "weight_decay", "momentum", "warmup_steps", "grad_clip", allow_zero=True)
    if t.steps_per_batch != "auto" and t.steps_per_batch < 1:
        raise ConfigError("train.steps_per_batch", f"must be >= 1 or auto, got {t.steps_per_batch}")
    if not 0.0 <= t.alpha <= 1.0:
        raise ConfigError("train.alpha", f"must be in [0, 1], got {t.alpha}")
    if t.device != "auto" and t.device != "cpu" and not (t.device == "cuda" or t.device.startswith("cuda:")):
        raise ConfigError("train.device", f"invalid value {t.device!r}. Valid: auto, cpu, cuda, cuda:N")
    _positive(cfg, "checkpoint", "every_steps", "every_seconds", "keep")
    _validate_learning(cfg)
    token = cfg.metrics.snapshot_token
    if token is not None and (not token.strip() or token != token.strip()):
        raise ConfigError("metrics.snapshot_token", "must be non-empty, without leading or trailing whitespace")
    _positive(cfg, "metrics", "max_connections", "request_timeout_s")
    _positive(cfg, "snapshot", "every_steps", "every_seconds", "keep", "export_timeout_s", "export_threads",
              "triton_max_batch_size", "publish_backoff_max_s")
    _positive(cfg, "snapshot", "triton_max_queue_delay_us", allow_zero=True)
    if cfg.snapshot.publish_to is not None and "://" not in cfg.snapshot.publish_to:
        raise ConfigError("snapshot.publish_to", f"expected a URL such as s3://bucket/prefix, gs://bucket/prefix or "
                                                 f"file:///path, got {cfg.snapshot.publish_to!r}")
    if not 0 <= cfg.metrics.port <= 65535:
        raise ConfigError("metrics.port", f"must be in 0..65535 (0: any free port), got {cfg.metrics.port}")


def _fraction(key: str, value: float, *, zero: bool = True) -> None:
    if not ((value >= 0.0 if zero else value > 0.0) and value <= 1.0):
        raise ConfigError(key, f"must be in {'[0' if zero else '(0'}, 1], got {value}")


def _validate_learning(cfg: Config) -> None:
    """Replay, EMA, gate, teacher budget and drift settings."""
    _positive(cfg, "replay", "capacity", "max_bytes")
    _positive(cfg, "replay", "ratio", "priority", allow_zero=True)
    _fraction("replay.recency_share", cfg.replay.recency_share)
    if cfg.replay.balance and cfg.replay.reweight:
        raise ConfigError("replay.reweight", "balances the classes of each step by weights, which replay.balance does "
                                             "by its draws: set one of them to false")
    if not 0.0 < cfg.ema.decay < 1.0:
        raise ConfigError("ema.decay", f"must be in (0, 1), got {cfg.ema.decay}")
    _fraction("gate.holdout_share", cfg.gate.holdout_share)
    _positive(cfg, "gate", "holdout_capacity")
    _fraction("gate.tolerance", cfg.gate.tolerance)
    t = cfg.teacher
    if t.budget != "adaptive":
        _fraction("teacher.budget", t.budget, zero=False)
    _fraction("teacher.budget_floor", t.budget_floor, zero=False)
    _fraction("teacher.budget_ceiling", t.budget_ceiling, zero=False)
    if t.budget_floor > t.budget_ceiling:
        raise ConfigError("teacher.budget_floor", f"must be <= teacher.budget_ceiling ({t.budget_ceiling}), "
                                                  f"got {t.budget_floor}")
    _fraction("teacher.random_share", t.random_share)
    if t.target_agreement is not None:
        _fraction("teacher.target_agreement", t.target_agreement, zero=False)
    _fraction("teacher.agreement_drop", t.agreement_drop)
    _positive(cfg, "drift", "lr_boost", "boost_steps", "boost_updates")
    _fraction("drift.boost_recent_share", cfg.drift.boost_recent_share)
    _positive(cfg, "drift", "protect_samples", "ema_steps", allow_zero=True)
    if not 0.0 < cfg.drift.ema_decay < 1.0:
        raise ConfigError("drift.ema_decay", f"must be in (0, 1), got {cfg.drift.ema_decay}")


def _check_kafka_extra(extra: Mapping[str, Any]) -> None:
    """``kafka.extra`` passes settings straight to kafka-python: only names it knows, none we manage."""
    from kafka import KafkaConsumer  # local: keeps `import streamkd.config` light

    managed = {f.name for f in dataclasses.fields(KafkaConfig)} | {
        "enable_auto_commit", "key_deserializer", "value_deserializer", "group_id"}
    for name in extra:
        if name in managed:
            raise ConfigError(f"kafka.extra.{name}", "is managed by streamkd; set it in the kafka section instead")
        if name not in KafkaConsumer.DEFAULT_CONFIG:
            valid = ", ".join(sorted(set(KafkaConsumer.DEFAULT_CONFIG) - managed))
            raise ConfigError(f"kafka.extra.{name}", f"unknown kafka-python consumer setting. Valid: {valid}")
