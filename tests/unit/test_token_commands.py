"""`antorcha token create|list|revoke` through the real CLI entry (`antorcha.cli.main`), on a real token
file: the store options (--tokens-file, --config, --json) work before and after the subcommand, as the
README and the coordinator's hint spell them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from antorcha.cli import main
from antorcha.security.tokens import Role, TokenStore


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().out


def _records(path: Path) -> dict[str, object]:
    store = TokenStore(path)
    try:
        return {r.id: r for r in store.list()}
    finally:
        store.close()


def test_create_list_revoke_with_options_after_the_subcommand(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokens = tmp_path / "tokens.sqlite"
    code, out = _run(["token", "create", "--name", "alice", "--tokens-file", str(tokens), "--json"], capsys)
    assert code == 0
    created = json.loads(out)
    assert created["name"] == "alice" and created["role"] == "worker"
    store = TokenStore(tokens)
    try:
        assert store.verify(created["token"], Role.WORKER).id == created["id"]  # a real, usable token
    finally:
        store.close()

    code, out = _run(["token", "list", "--tokens-file", str(tokens), "--json"], capsys)
    assert code == 0
    rows = json.loads(out)
    assert [(r["id"], r["name"], r["state"]) for r in rows] == [(created["id"], "alice", "valid")]

    code, out = _run(["token", "revoke", created["id"], "--tokens-file", str(tokens)], capsys)
    assert code == 0 and f"revoked worker token {created['id']} (alice)" in out
    assert _records(tokens)[created["id"]].revoked_unix is not None  # type: ignore[attr-defined]

    code, out = _run(["token", "list", "--json", "--tokens-file", str(tokens)], capsys)
    assert [r["state"] for r in json.loads(out)] == ["revoked"]


def test_config_after_the_subcommand_finds_the_token_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    config = tmp_path / "coordinator.toml"
    config.write_text(f"[coordinator]\ndata_dir = {str(data_dir)!r}\n")
    code, out = _run(["token", "create", "--name", "bob", "--operator", "--config", str(config)], capsys)
    assert code == 0 and out.startswith("ant_")
    (record,) = _records(data_dir / "tokens.sqlite").values()
    assert record.name == "bob" and record.role == Role.OPERATOR  # type: ignore[attr-defined]

    code, out = _run(["token", "list", "--config", str(config)], capsys)
    assert code == 0 and "bob" in out and "valid" in out
    code, out = _run(["token", "revoke", "bob", "--config", str(config)], capsys)
    assert code == 0 and "revoked operator token" in out


def test_options_before_the_subcommand_still_work_and_are_not_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokens = tmp_path / "tokens.sqlite"
    code, out = _run(["token", "--tokens-file", str(tokens), "--json", "create", "--name", "carol"], capsys)
    assert code == 0 and json.loads(out)["name"] == "carol"
    code, out = _run(["token", "--tokens-file", str(tokens), "--json", "list"], capsys)
    assert code == 0 and [r["name"] for r in json.loads(out)] == ["carol"]
    # Mixed: the file before, --json after.
    code, out = _run(["token", "--tokens-file", str(tokens), "list", "--json"], capsys)
    assert code == 0 and [r["name"] for r in json.loads(out)] == ["carol"]
    code, out = _run(["token", "--tokens-file", str(tokens), "revoke", "carol"], capsys)
    assert code == 0 and "carol" in out
    code, out = _run(["token", "--tokens-file", str(tokens), "revoke", "carol"], capsys)
    assert code == 3  # nothing live left by that name


def test_the_coordinators_hint_parses() -> None:
    from antorcha.cli import build_parser

    args = build_parser().parse_args(["token", "create", "--name", "NAME", "--tokens-file", "PATH"])
    assert (args.token_command, args.name, args.tokens_file, args.config, args.json) == (
        "create",
        "NAME",
        "PATH",
        None,
        False,
    )
