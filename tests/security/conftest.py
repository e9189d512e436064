"""A secured coordinator (join tokens, signed sessions) with two honest workers, shared by the tests of
one module: each test does one bad thing, asserts the exact answer, then `unharmed` checks that the
honest workers' next round completes with every replica's θ checksum equal to the coordinator's."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from antorcha.experiments.cluster import LocalCluster
from antorcha.proto.antorcha.v1 import coordinator_pb2 as pb
from antorcha.security.tokens import Role, TokenStore

RUN = {
    "run_id": "secured",
    "model_size": "nano",
    "seq_len": 32,
    "batch_size": 2,
    "round_mode": "fixed_steps",
    "inner_steps": 4,
    "min_workers": 2,
    "max_rounds": 0,
    "eval_batches": 1,
    "round_deadline_s": 60.0,
    "allreduce_timeout_s": 10.0,
    "corpus_max_bytes": 300_000,
}


@dataclass
class Secured:
    cluster: LocalCluster
    tokens: TokenStore
    workdir: Path

    @property
    def address(self) -> str:
        return self.cluster.address

    def token(self, name: str, role: Role = Role.WORKER, ttl_s: float | None = None) -> str:
        return self.tokens.create(name, role, ttl_s)[0]

    def unharmed(self, after_round: int | None = None, timeout_s: float = 120.0) -> pb.RunStatus:
        """The honest workers finish another round after `after_round` (default: now), all replicas agree."""
        start = self.cluster.status().round if after_round is None else after_round
        status = self.cluster.wait_for(
            lambda s: any(r.round > start and r.workers >= 2 for r in s.rounds), timeout_s
        )
        newest = [r for r in status.rounds if r.round > start]
        assert newest and all(r.replicas_consistent for r in newest), [
            (r.round, r.workers, r.replicas_consistent) for r in status.rounds
        ]
        for name in ("honest-a", "honest-b"):
            assert self.cluster.workers[name].poll() is None, self.cluster.tail(name)
        return status


def start_secured(workdir: Path, extra_coordinator: dict[str, object] | None = None) -> Secured:
    data_dir = workdir / "coordinator-data"
    tokens = TokenStore(data_dir / "tokens.sqlite")
    operator_token = tokens.create("test-operator", Role.OPERATOR)[0]
    cluster = LocalCluster(
        workdir,
        run=RUN,
        coordinator={
            "auth": "tokens",
            "data_dir": str(data_dir),
            "http_port": 0,
            "lease_s": 4.0,
            **(extra_coordinator or {}),
        },
        client_options={"operator_token": operator_token},
    )
    cluster.start_coordinator()
    for name in ("honest-a", "honest-b"):
        cluster.start_worker(name, {"token": tokens.create(name)[0]})
    return Secured(cluster, tokens, workdir)


@pytest.fixture(scope="session")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    env = start_secured(tmp_path_factory.mktemp("secured"))
    try:
        env.unharmed(after_round=-1, timeout_s=180)
        yield env
    finally:
        env.cluster.stop()
        env.tokens.close()
