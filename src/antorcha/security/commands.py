"""`antorcha token create|list|revoke` and `antorcha tls self-signed`: the operator's side of tokens
and TLS. Token commands work on the coordinator's token file directly (the running coordinator reads
it on every check, so a revocation takes effect at the worker's next call)."""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from antorcha.config import CoordinatorConfig, load_config


def _tokens_file(args: argparse.Namespace) -> str:
    if args.tokens_file:
        return str(args.tokens_file)
    settings = load_config(CoordinatorConfig, args.config).coordinator
    path = settings.resolved_tokens_file()
    if not path:
        raise SystemExit(
            "antorcha token: say where the tokens live: --tokens-file PATH, or --config with a coordinator "
            "config whose [coordinator] data_dir or tokens_file is set"
        )
    return path


def _when(unix: float | None) -> str:
    return "never" if unix is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix))


def _token(args: argparse.Namespace) -> int:
    from antorcha.security.tokens import Role, TokenStore, parse_duration

    store = TokenStore(_tokens_file(args))
    try:
        if args.token_command == "create":
            ttl = parse_duration(args.expires) if args.expires else None
            role = Role.OPERATOR if args.operator else Role.WORKER
            token, record = store.create(args.name, role, ttl)
            if args.json:
                print(
                    json.dumps(
                        {
                            "token": token,
                            "id": record.id,
                            "name": record.name,
                            "role": str(role),
                            "expires_unix": record.expires_unix,
                        }
                    )
                )
            else:
                print(token)
                print(
                    f"# {role} token {record.id} for {record.name!r}, expires {_when(record.expires_unix)}. "
                    "Shown once: only its hash is kept.",
                )
            return 0
        if args.token_command == "list":
            rows: list[dict[str, Any]] = [
                {
                    "id": r.id,
                    "name": r.name,
                    "role": str(r.role),
                    "created": _when(r.created_unix),
                    "expires": _when(r.expires_unix),
                    "state": "revoked"
                    if r.revoked_unix
                    else ("expired" if r.refusal(time.time()) else "valid"),
                }
                for r in store.list()
            ]
            if args.json:
                print(json.dumps(rows))
            else:
                print(f"{'id':<14} {'name':<20} {'role':<9} {'state':<8} {'expires':<24}")
                for row in rows:
                    print(
                        f"{row['id']:<14} {row['name'][:20]:<20} {row['role']:<9} {row['state']:<8} "
                        f"{row['expires']:<24}"
                    )
            return 0
        revoked = store.revoke(args.token)
        if not revoked:
            print(f"antorcha token revoke: no live token has the id or name {args.token!r}")
            return 3
        for r in revoked:
            print(f"revoked {r.role} token {r.id} ({r.name}); its workers are refused at their next call")
        return 0
    finally:
        store.close()


def _tls(args: argparse.Namespace) -> int:
    from antorcha.security.tls import make_self_signed

    cert, key = make_self_signed(args.out, args.host or ["127.0.0.1", "localhost"], args.days)
    print(f"wrote {cert} and {key}")
    print(f"coordinator: tls_cert_file = {str(cert)!r}, tls_key_file = {str(key)!r}")
    print(f"workers and operators: tls_ca_file = {str(cert)!r} (or --tls-ca {cert})")
    return 0


def _add_token_store_options(p: argparse.ArgumentParser, *, after_command: bool = False) -> None:
    """--tokens-file, --config and --json, accepted before and after the token subcommand.

    A subcommand's parser writes every default it has over what the `token` parser already parsed,
    so its copies have no default (SUPPRESS): a value given before the subcommand then survives.
    """
    unset: dict[str, Any] = {"default": argparse.SUPPRESS} if after_command else {}
    p.add_argument("--tokens-file", help="the coordinator's token file (default: from --config)", **unset)
    p.add_argument(
        "--config", help="the coordinator's TOML config (its data_dir holds tokens.sqlite)", **unset
    )
    p.add_argument("--json", action="store_true", help="print JSON", **unset)


def add_security_parsers(sub: Any) -> None:
    p = sub.add_parser("token", help="make, list and revoke join and operator tokens")
    _add_token_store_options(p)
    tsub = p.add_subparsers(dest="token_command", required=True)
    c = tsub.add_parser("create", help="make a token and print it (once)")
    c.add_argument("--name", required=True, help="who or what it is for, e.g. the volunteer's name")
    c.add_argument("--expires", help="lifetime, e.g. 12h or 30d (default: no expiry)")
    c.add_argument("--operator", action="store_true", help="an operator token (pause, resume, evict, status)")
    listing = tsub.add_parser("list", help="show tokens (never their secrets)")
    r = tsub.add_parser("revoke", help="revoke a token by id, or every live token with this name")
    r.add_argument("token", help="token id or name")
    for command in (c, listing, r):
        _add_token_store_options(command, after_command=True)
    p.set_defaults(fn=_token)

    p = sub.add_parser("tls", help="TLS helpers")
    tsub = p.add_subparsers(dest="tls_command", required=True)
    s = tsub.add_parser("self-signed", help="write a self-signed cert.pem and key.pem (for tests)")
    s.add_argument("--out", required=True, help="folder to write cert.pem and key.pem into")
    s.add_argument("--host", action="append", help="a name or IP the certificate is for (repeatable)")
    s.add_argument("--days", type=int, default=30)
    p.set_defaults(fn=_tls)


def add_connection_options(p: argparse.ArgumentParser) -> None:
    """Options of commands that talk to a coordinator as an operator."""
    p.add_argument("--coordinator", default="127.0.0.1:50051", help="host:port of its gRPC server")
    p.add_argument(
        "--token",
        default=os.environ.get("ANTORCHA_OPERATOR_TOKEN", ""),
        help="operator token (default: $ANTORCHA_OPERATOR_TOKEN)",
    )
    p.add_argument("--tls", action="store_true", help="connect over TLS with the system's trusted roots")
    p.add_argument("--tls-ca", default="", help="PEM certificate to trust (implies --tls)")
