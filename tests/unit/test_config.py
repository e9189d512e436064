"""Loading settings: defaults, TOML files, ANTORCHA_* environment overrides, errors that name the field."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from antorcha.config import (
    ConfigError,
    CoordinatorConfig,
    CoordinatorSettings,
    RunSpec,
    WorkerConfig,
    load_config,
)


def _toml(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_load_without_file_or_environment() -> None:
    config = load_config(CoordinatorConfig, environ={})
    assert config == CoordinatorConfig()
    assert config.run.inner_steps == 20
    assert config.run.codec == "none"
    assert config.coordinator.lease_s >= 2 * config.coordinator.heartbeat_interval_s
    worker = load_config(WorkerConfig, environ={})
    assert worker.worker.device == "auto"
    assert worker.worker.client_mode is False


def test_toml_values_are_read(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        """
[coordinator]
port = 6000
lease_s = 9.5
p2p_host_maddrs = ["/ip4/0.0.0.0/tcp/7000"]

[run]
run_id = "exp-1"
inner_steps = 50
outer_nesterov = false
codec = "bf16"
""",
    )
    config = load_config(CoordinatorConfig, path, environ={})
    assert config.coordinator.port == 6000
    assert config.coordinator.lease_s == 9.5
    assert config.coordinator.p2p_host_maddrs == ["/ip4/0.0.0.0/tcp/7000"]
    assert config.run.run_id == "exp-1"
    assert config.run.inner_steps == 50
    assert config.run.outer_nesterov is False
    assert config.run.codec == "bf16"
    assert config.run.seq_len == RunSpec().seq_len, "unset fields keep their defaults"


def test_path_may_be_a_string(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[worker]\nname = 'gpu-box'\n")
    assert load_config(WorkerConfig, str(path), environ={}).worker.name == "gpu-box"


def test_environment_overrides_file_with_typed_values(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[run]\ninner_steps = 10\nmodel_size = 'nano'\n")
    environ = {
        "ANTORCHA_RUN__INNER_STEPS": "50",
        "ANTORCHA_RUN__OUTER_LR": "0.5",
        "ANTORCHA_RUN__OUTER_NESTEROV": "false",
        "ANTORCHA_RUN__MODEL_SIZE": "micro",  # not TOML: taken as a plain string
        "ANTORCHA_COORDINATOR__P2P_HOST_MADDRS": '["/ip4/0.0.0.0/tcp/4000", "/ip6/::/tcp/4000"]',
        "ANTORCHA_COORDINATOR__PORT": "0",
        "ANTORCHA_LOG_LEVEL": "DEBUG",  # no section: not a config field
        "ANTORCHA_WORKER__NAME": "elsewhere",  # a section this config does not have
        "OTHER_RUN__INNER_STEPS": "7",  # not ours
    }
    config = load_config(CoordinatorConfig, path, environ=environ)
    assert config.run.inner_steps == 50
    assert config.run.outer_lr == 0.5
    assert config.run.outer_nesterov is False
    assert config.run.model_size == "micro"
    assert config.coordinator.p2p_host_maddrs == ["/ip4/0.0.0.0/tcp/4000", "/ip6/::/tcp/4000"]
    assert config.coordinator.port == 0


def test_worker_environment_overrides() -> None:
    environ = {
        "ANTORCHA_WORKER__CLIENT_MODE": "true",
        "ANTORCHA_WORKER__COORDINATOR": "10.0.0.5:50051",
        "ANTORCHA_WORKER__P2P_ANNOUNCE_MADDRS": "['/ip4/1.2.3.4/tcp/31337']",
        "ANTORCHA_WORKER__RPC_TIMEOUT_S": "12",
    }
    worker = load_config(WorkerConfig, environ=environ).worker
    assert worker.client_mode is True
    assert worker.coordinator == "10.0.0.5:50051"
    assert worker.p2p_announce_maddrs == ["/ip4/1.2.3.4/tcp/31337"]
    assert worker.rpc_timeout_s == 12.0


@pytest.mark.parametrize(
    ("model", "key", "value", "field"),
    [
        (CoordinatorConfig, "ANTORCHA_RUN__RUN_ID", "2024", "run_id"),
        (WorkerConfig, "ANTORCHA_WORKER__TOKEN", "12345", "token"),
        (WorkerConfig, "ANTORCHA_WORKER__NAME", "true", "name"),
    ],
)
def test_string_fields_take_number_like_environment_values_as_strings(
    model: type[CoordinatorConfig] | type[WorkerConfig], key: str, value: str, field: str
) -> None:
    """A run id, join token or name that looks like a TOML number or boolean is still that string."""
    config = load_config(model, environ={key: value})
    section = config.run if isinstance(config, CoordinatorConfig) else config.worker
    assert getattr(section, field) == value


def test_environment_is_read_from_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTORCHA_RUN__INNER_STEPS", "33")
    assert load_config(CoordinatorConfig).run.inner_steps == 33
    assert load_config(CoordinatorConfig, environ={}).run.inner_steps == 20, "an explicit environ wins"


def test_unknown_field_in_file_is_named(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[run]\ninner_stepz = 5\n")
    with pytest.raises(ConfigError, match=r"run\.inner_stepz") as info:
        load_config(CoordinatorConfig, path, environ={})
    assert str(path) in str(info.value)


def test_unknown_section_in_file_is_named(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[runn]\ninner_steps = 5\n")
    with pytest.raises(ConfigError, match="runn"):
        load_config(CoordinatorConfig, path, environ={})


def test_unknown_field_in_environment_is_named() -> None:
    with pytest.raises(ConfigError, match=r"worker\.clientmode"):
        load_config(WorkerConfig, environ={"ANTORCHA_WORKER__CLIENTMODE": "true"})


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("[run]\ninner_steps = 0\n", "run.inner_steps"),
        ("[run]\ninner_lr = 1.5\n", "run.inner_lr"),
        ("[run]\ncodec = 'int3'\n", "run.codec"),
        ("[run]\nseq_len = 'long'\n", "run.seq_len"),
        ("[coordinator]\nport = 70000\n", "coordinator.port"),
    ],
)
def test_invalid_value_in_file_is_named(tmp_path: Path, text: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(CoordinatorConfig, _toml(tmp_path, text), environ={})


def test_invalid_value_in_environment_is_named() -> None:
    with pytest.raises(ConfigError, match=r"run\.inner_steps"):
        load_config(CoordinatorConfig, environ={"ANTORCHA_RUN__INNER_STEPS": "0"})


def test_every_problem_is_reported(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[run]\ninner_steps = 0\nbatch_sise = 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(CoordinatorConfig, path, environ={})
    assert "run.inner_steps" in str(info.value) and "run.batch_sise" in str(info.value)


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[run\ninner_steps = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(CoordinatorConfig, path, environ={})


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="not found") as info:
        load_config(CoordinatorConfig, missing, environ={})
    assert str(missing) in str(info.value)


def test_unreadable_path_is_a_config_error(tmp_path: Path) -> None:
    """A directory, or a file that is not UTF-8, is a config problem like any other (CLI exit 2)."""
    with pytest.raises(ConfigError):
        load_config(CoordinatorConfig, tmp_path, environ={})
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"[run]\nrun_id = '\xff\xfe'\n")
    with pytest.raises(ConfigError):
        load_config(CoordinatorConfig, binary, environ={})


@pytest.mark.parametrize(
    ("lease_s", "heartbeat_s", "ok"), [(1.9, 1.0, False), (2.0, 1.0, True), (0.5, 1.0, False)]
)
def test_lease_must_outlive_two_heartbeats(
    tmp_path: Path, lease_s: float, heartbeat_s: float, ok: bool
) -> None:
    path = _toml(tmp_path, f"[coordinator]\nlease_s = {lease_s}\nheartbeat_interval_s = {heartbeat_s}\n")
    if ok:
        assert load_config(CoordinatorConfig, path, environ={}).coordinator.lease_s == lease_s
    else:
        with pytest.raises(ConfigError, match="lease_s"):
            load_config(CoordinatorConfig, path, environ={})
        with pytest.raises(ValidationError):
            CoordinatorSettings(lease_s=lease_s, heartbeat_interval_s=heartbeat_s)


def test_settings_are_frozen() -> None:
    spec = RunSpec()
    with pytest.raises(ValidationError):
        spec.inner_steps = 3  # type: ignore[misc]


def test_run_spec_sha256_is_stable_and_covers_every_field(tmp_path: Path) -> None:
    digest = RunSpec().sha256()
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert RunSpec().sha256() == digest
    from_file = load_config(CoordinatorConfig, _toml(tmp_path, "[run]\ninner_steps = 20\n"), environ={})
    assert from_file.run.sha256() == digest, "same values, however they were given"
    assert RunSpec(inner_steps=21).sha256() != digest
    assert RunSpec(outer_nesterov=False).sha256() != digest
    assert RunSpec(run_id="other").sha256() != digest
    assert RunSpec(inner_lr=RunSpec().inner_lr * (1 + 1e-12)).sha256() != digest
    changed = {
        name: RunSpec.model_validate({**RunSpec().model_dump(), name: value}).sha256()
        for name, value in {"seq_len": 64, "codec": "fp16", "seed": 1, "model_size": "micro"}.items()
    }
    assert len(set(changed.values()) | {digest}) == len(changed) + 1


def test_cli_refuses_bad_config_before_starting_anything(tmp_path: Path) -> None:
    bad = _toml(tmp_path, "[coordinator]\nport = 0\n\n[run]\ninner_stepz = 5\n", name="bad.toml")
    ready = tmp_path / "ready.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANTORCHA_")}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "antorcha", "coordinator", "--config", str(bad), "--ready-file", str(ready)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    assert "run.inner_stepz" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not ready.exists(), "nothing was started"
    assert elapsed < 30, f"took {elapsed:.1f}s"
