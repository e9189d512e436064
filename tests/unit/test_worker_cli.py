"""`antorcha worker`'s command line: what it overrides in the config, and how it refuses a bad token
file (exit 2 with the reason, before anything connects)."""

from __future__ import annotations

from pathlib import Path

import pytest

from antorcha.cli import build_parser, main, worker_settings


def test_token_file_and_tls_ca_override_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "worker.toml"
    config.write_text('[worker]\ncoordinator = "a.example:1"\ntoken = "ant_from_config"\n')
    token = tmp_path / "token"
    token.write_text("ant_abc_secret\n")
    args = build_parser().parse_args(
        ["worker", "--config", str(config), "--token-file", str(token), "--tls-ca", "ca.pem"]
    )
    settings = worker_settings(args)
    assert settings.token == "ant_abc_secret", "read from the file, newline stripped"
    assert settings.tls_ca_file == "ca.pem"
    assert settings.coordinator == "a.example:1", "what the command line does not name stays"
    plain = worker_settings(build_parser().parse_args(["worker", "--config", str(config)]))
    assert plain.token == "ant_from_config" and plain.tls_ca_file == ""


@pytest.mark.parametrize("content", [None, "  \n"], ids=["missing", "empty"])
def test_a_missing_or_empty_token_file_is_refused_with_its_name(
    tmp_path: Path, content: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    token = tmp_path / "token"
    if content is not None:
        token.write_text(content)
    assert main(["worker", "--token-file", str(token), "--coordinator", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "--token-file" in err and str(token) in err
