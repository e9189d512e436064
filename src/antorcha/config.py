"""Settings of a run, a coordinator and a worker: pydantic models loaded from TOML and the environment.

Every field has a default and a description. Unknown fields are refused, so a typo in a config file
fails at start with the field named instead of being silently ignored. Environment variables named
``ANTORCHA_<SECTION>__<FIELD>`` (e.g. ``ANTORCHA_RUN__INNER_STEPS=50``) override the file.
"""

from __future__ import annotations

import hashlib
import os
import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from antorcha.netem.links import parse_link

Codec = Literal["none", "fp16", "bf16", "int8", "int4"]
RoundMode = Literal["token_budget", "fixed_steps"]
ENV_PREFIX = "ANTORCHA_"
ConfigT = TypeVar("ConfigT", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration file or variable is invalid; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunSpec(_Strict):
    """What is trained and how: identical for every worker of a run (sent to them at Join)."""

    run_id: str = Field("demo", description="Name of the run; checkpoints and metrics carry it.")
    model_size: str = Field("nano", description="Built-in model preset (see antorcha.model.MODEL_SIZES).")
    seq_len: int = Field(128, ge=8, le=65536, description="Tokens per training sequence.")
    batch_size: int = Field(16, ge=1, le=4096, description="Sequences per inner step on each worker.")
    inner_steps: int = Field(
        20,
        ge=1,
        le=100_000,
        description="H: inner AdamW steps per round (per worker on average in token-budget rounds).",
    )
    round_mode: RoundMode = Field(
        "token_budget",
        description="token_budget: a round closes when the workers together trained its token budget, "
        "fast workers doing more steps; fixed_steps: every worker does H steps (classic DiLoCo).",
    )
    round_tokens: int = Field(
        0,
        ge=0,
        description="Token budget of a round; 0 = H x batch_size x seq_len per worker active at its start.",
    )
    shard_steps: int = Field(
        0,
        ge=0,
        description="Inner steps per leased data shard; 0 = H in fixed_steps rounds, ceil(H/8) in "
        "token_budget rounds (smaller shards let the budget be split more evenly).",
    )
    overlap: bool = Field(
        False,
        description="Average round r in the background while round r+1 trains; the outer update lands "
        "one round late (overlapped DiLoCo), so compute does not wait on the network.",
    )
    inner_lr: float = Field(3e-3, gt=0, lt=1, description="AdamW learning rate of the inner steps.")
    inner_weight_decay: float = Field(0.01, ge=0, lt=1, description="AdamW weight decay.")
    inner_warmup_steps: int = Field(20, ge=0, description="Linear warm-up of the inner learning rate.")
    inner_decay_steps: int = Field(
        0,
        ge=0,
        description="Cosine decay of the inner learning rate to 10% over this many of a worker's steps "
        "(counted from the start, warm-up included); 0 keeps it constant after warm-up.",
    )
    grad_clip: float = Field(1.0, gt=0, description="Clip the gradient norm of each inner step to this.")
    outer_lr: float = Field(0.7, gt=0, le=10, description="Learning rate of the outer Nesterov SGD.")
    outer_momentum: float = Field(0.9, ge=0, lt=1, description="Momentum of the outer SGD.")
    outer_nesterov: bool = Field(True, description="Use Nesterov momentum in the outer step.")
    codec: Codec = Field(
        "none",
        description="Encoding of pseudo-gradients on the data plane: none (fp32), fp16, bf16, "
        "int8 or int4 (per-block fp32 scales).",
    )
    error_feedback: bool = Field(
        False, description="Add each round's quantisation residual to the next round's pseudo-gradient."
    )
    max_rounds: int = Field(0, ge=0, description="Stop after this many rounds; 0 runs until stopped.")
    min_workers: int = Field(1, ge=1, description="Workers needed before round 0 starts.")
    round_deadline_s: float = Field(600.0, gt=0, description="Close a round this long after it opens.")
    allreduce_timeout_s: float = Field(
        30.0, gt=0, description="Give up on a silent averaging peer after this."
    )
    eval_batches: int = Field(8, ge=1, description="Held-out batches evaluated after every round.")
    num_data_shards: int = Field(
        0,
        ge=0,
        description="Shards of the training split; 0 = shard_steps worth of one worker's tokens each.",
    )
    corpus_max_bytes: int = Field(8_000_000, ge=100_000, description="Bytes of the offline corpus to use.")
    seed: int = Field(0, description="Seed of the initial parameters and data order.")

    def sha256(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()

    @property
    def steps_per_shard(self) -> int:
        if self.shard_steps:
            return self.shard_steps
        if self.round_mode == "fixed_steps":
            return self.inner_steps
        return -(-self.inner_steps // 8)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


class CoordinatorSettings(_Strict):
    """How the coordinator process listens and keeps time."""

    host: str = Field("127.0.0.1", description="Address the gRPC server binds to.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    p2p_host_maddrs: list[str] = Field(
        default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"], description="hivemind listen multiaddrs."
    )
    p2p_announce_maddrs: list[str] = Field(
        default_factory=list, description="Public multiaddrs to tell workers (behind NAT/port mapping)."
    )
    lease_s: float = Field(5.0, gt=0, description="A worker silent this long loses its lease.")
    heartbeat_interval_s: float = Field(1.0, gt=0, description="How often workers should heartbeat.")
    tick_interval_s: float = Field(0.1, gt=0, description="How often leases and deadlines are checked.")
    max_message_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest gRPC message accepted.")
    state_chunk_bytes: int = Field(1024 * 1024, ge=1024, description="Size of streamed state chunks.")
    torch_threads: int = Field(1, ge=1, description="CPU threads for the coordinator's replica.")
    data_dir: str = Field(
        "", description="Where the run's database and checkpoints live; empty = keep nothing."
    )
    checkpoints_keep: int = Field(3, ge=1, description="How many of the newest checkpoints to keep.")
    http_port: int = Field(
        8080, ge=0, le=65535, description="Port of the dashboard, its JSON API and /metrics (HTTP); 0 = off."
    )
    http_host: str = Field(
        "",
        description="Address the dashboard binds to; empty = the gRPC `host`. It has no login: keep it "
        "on a private address or behind a proxy that authenticates.",
    )

    @model_validator(mode="after")
    def _lease_outlives_heartbeats(self) -> CoordinatorSettings:
        if self.lease_s < 2 * self.heartbeat_interval_s:
            raise ValueError("lease_s must be at least twice heartbeat_interval_s")
        return self


class WorkerSettings(_Strict):
    """How one volunteer's worker runs."""

    coordinator: str = Field("127.0.0.1:50051", description="host:port of the coordinator's gRPC server.")
    name: str = Field("", description="Human-readable name; the hostname when empty.")
    device: Literal["auto", "cuda", "mps", "cpu"] = Field("auto", description="Where to train.")
    torch_threads: int = Field(0, ge=0, description="CPU threads for torch; 0 leaves torch's default.")
    p2p_host_maddrs: list[str] = Field(
        default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"], description="hivemind listen multiaddrs."
    )
    p2p_announce_maddrs: list[str] = Field(default_factory=list, description="Public multiaddrs to announce.")
    client_mode: bool = Field(False, description="Dial out only (behind NAT): reduce no part of the vector.")
    token: str = Field("", description="Join token given by the operator.")
    identity_file: str = Field("", description="Keep the worker id here to resume it after a restart.")
    rpc_timeout_s: float = Field(30.0, gt=0, description="Deadline of ordinary RPCs to the coordinator.")
    connect_timeout_s: float = Field(
        120.0, gt=0, description="Give up (exit 4) when the coordinator cannot be reached this long at start."
    )
    slowdown: float = Field(
        1.0, ge=1.0, description="Emulate slower hardware: each inner step takes this many times longer."
    )
    emulate_link: str = Field(
        "",
        description="Experiments: pace this worker's data plane in the application as a link of this "
        "bandwidth and RTT, e.g. '100mbit/100ms' (where the kernel cannot shape one; see antorcha.netem).",
    )

    @field_validator("emulate_link")
    @classmethod
    def _valid_link(cls, value: str) -> str:
        if value:
            parse_link(value)  # raises ValueError with what is wrong
        return value

    metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Serve Prometheus metrics at http://metrics_host:PORT/metrics; 0 = off.",
    )
    metrics_host: str = Field("0.0.0.0", description="Address the metrics endpoint binds to.")
    progress: Literal["auto", "line", "log", "off"] = Field(
        "auto",
        description="Progress display: line (one updating line on stderr), log (a log line every "
        "progress_interval_s), off; auto = line on a terminal, log otherwise.",
    )
    progress_interval_s: float = Field(10.0, gt=0, description="Seconds between progress log lines.")
    summary_file: str = Field(
        "", description="Write a JSON summary here at exit (rounds, tokens, compute utilisation, bytes)."
    )
    fault_plan: str = Field(
        "", description="Chaos testing: JSON list of faults (see antorcha.worker.faults)."
    )


class CoordinatorConfig(_Strict):
    """A coordinator config file: [coordinator] and [run] tables."""

    coordinator: CoordinatorSettings = Field(default_factory=CoordinatorSettings)
    run: RunSpec = Field(default_factory=RunSpec)


class WorkerConfig(_Strict):
    """A worker config file: a [worker] table."""

    worker: WorkerSettings = Field(default_factory=WorkerSettings)


def _is_text_field(model: type[BaseModel], section: str, field: str) -> bool:
    section_type = model.model_fields[section].annotation
    fields = getattr(section_type, "model_fields", {})
    return field in fields and fields[field].annotation is str


def _env_overrides(
    model: type[BaseModel], environ: dict[str, str], sections: set[str]
) -> dict[str, dict[str, Any]]:
    overrides: dict[str, dict[str, Any]] = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or "__" not in key:
            continue
        section, _, field = key[len(ENV_PREFIX) :].lower().partition("__")
        if section not in sections:
            continue
        # Values are parsed as TOML so numbers, booleans and lists keep their types, except for text
        # fields, where "2024" or "true" is meant literally.
        parsed: Any = value
        if not _is_text_field(model, section, field):
            try:
                parsed = tomllib.loads(f"v = {value}")["v"]
            except tomllib.TOMLDecodeError:
                parsed = value
        overrides.setdefault(section, {})[field] = parsed
    return overrides


def _format_error(err: ValidationError, source: str) -> str:
    problems = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"])
        problems.append(f"{where}: {e['msg']}")
    return f"invalid config ({source}): " + "; ".join(problems)


def load_config(
    model: type[ConfigT], path: str | Path | None = None, environ: dict[str, str] | None = None
) -> ConfigT:
    """Read `model` from a TOML file (optional) with ANTORCHA_* environment overrides on top."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"config file not found: {path}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from e
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} cannot be read: {e}") from e
    sections = set(model.model_fields)
    env = dict(os.environ if environ is None else environ)
    for section, fields in _env_overrides(model, env, sections).items():
        data.setdefault(section, {}).update(fields)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None
