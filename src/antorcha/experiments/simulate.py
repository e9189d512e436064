"""DiLoCo in one process, for tuning before launching real clusters: the same model, inner trainer,
codecs (per-span quantisation with error feedback), weighted average and outer optimizer as the
distributed system, with the workers run one after another. No network, no coordinator: use it to
pick an outer learning rate or sweep H quickly; measure bytes and wall time on a real cluster.

Data: worker w trains in round r on the (r·W + w)-th shard of the data ledger's seeded permutation,
read front to back, as a real run's ledger hands them out (neighbouring shards hold neighbouring
files, so taking them in order would make every round's data far from i.i.d.).

Trust experiments: `attacks` makes some workers hostile (a float scales their Δ, e.g. -10 poisons;
"zero" and "random" are lazy workers), `absent` leaves workers out entirely (the honest-only
baseline with the same data for the others), and the average of each span is taken chunk by chunk
with the reducer's own rules (`averaging.robust`: norm-outlier bound and `spec.aggregation`), over the
same span layout as the data plane.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from itertools import pairwise

import torch

from antorcha.averaging.codecs import roundtrip
from antorcha.averaging.robust import AggregationPolicy, aggregate, norm_outliers
from antorcha.averaging.spans import CHUNK_ELEMENTS
from antorcha.config import RunSpec
from antorcha.coordinator.ledger import DataLedger
from antorcha.data import BYTE_VOCAB_SIZE, eval_batches, evaluate, load_stdlib_corpus
from antorcha.data.source import shard_reader
from antorcha.diloco.inner import InnerTrainer
from antorcha.diloco.outer import OuterOptimizer
from antorcha.diloco.params import ParamLayout
from antorcha.model import build_model


@dataclass
class SimulationResult:
    workers: int
    rounds: int
    inner_steps: int
    codec: str
    error_feedback: bool
    outer_lr: float
    tokens: int
    initial_eval_loss: float
    final_eval_loss: float
    evals: list[tuple[int, float]] = field(default_factory=list)  # (tokens, eval loss) per round
    seconds: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _split_like_the_data_plane(vector: torch.Tensor, members: int) -> list[tuple[int, int]]:
    """Quantisation blocks start at each reducer's span, as on the wire: equal spans per member."""
    n = vector.numel()
    bounds = [round(i * n / members) for i in range(members + 1)]
    return list(pairwise(bounds))


def _quantise(codec: str, vector: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    if codec == "none":
        return vector.clone()
    out = torch.empty_like(vector)
    for lo, hi in spans:
        out[lo:hi] = roundtrip(codec, vector[lo:hi])
    return out


Attack = float | str  # a scale factor for Δ, or "zero" / "random"


def _attacked(delta: torch.Tensor, attack: Attack, seed: int) -> torch.Tensor:
    if attack == "zero":
        return torch.zeros_like(delta)
    if attack == "random":  # noise with the honest Δ's norm: a lazy worker hiding from the norm check
        noise = torch.randn(delta.shape, generator=torch.Generator().manual_seed(seed))
        return noise * (torch.linalg.vector_norm(delta) / torch.linalg.vector_norm(noise))
    return torch.mul(delta, float(attack))


def reduce_like_the_data_plane(
    policy: AggregationPolicy,
    sent: list[torch.Tensor],
    weights: list[float],
    spans: list[tuple[int, int]],
) -> torch.Tensor:
    """What the reducers compute: per span, per chunk, drop norm outliers and aggregate the rest."""
    out = torch.zeros_like(sent[0])
    for lo, hi in spans:
        for start in range(lo, hi, CHUNK_ELEMENTS):
            stop = min(start + CHUNK_ELEMENTS, hi)
            parts = {i: v[start:stop] for i, v in enumerate(sent)}
            norms = {str(i): float(torch.linalg.vector_norm(v)) for i, v in parts.items()}
            dropped = {int(i) for i in norm_outliers(norms, policy.norm_outlier_k)}
            kept = [i for i in parts if i not in dropped]
            out[start:stop] = aggregate(policy, [parts[i] for i in kept], [weights[i] for i in kept])
    return out


def simulate(
    spec: RunSpec,
    workers: int,
    rounds: int,
    *,
    eval_every: int = 1,
    attacks: Mapping[int, Attack] | None = None,
    absent: frozenset[int] = frozenset(),
) -> SimulationResult:
    """Run `rounds` DiLoCo rounds of `workers` workers with `spec` and return the eval-loss curve.
    Workers in `attacks` send a corrupted Δ every round; workers in `absent` take no part."""
    attacks = attacks or {}
    policy = AggregationPolicy(
        spec.aggregation, spec.norm_outlier_k, spec.clip_iterations, spec.trim_fraction
    )
    started = time.perf_counter()
    corpus = load_stdlib_corpus(spec.corpus_max_bytes)
    tokens_per_round = spec.inner_steps * spec.tokens_per_step
    num_shards = max(workers * rounds, corpus.train.numel() // tokens_per_round)
    order = DataLedger(num_shards, seed=spec.seed).order(0)
    evals_data = eval_batches(corpus.eval, spec.seq_len, spec.batch_size, spec.eval_batches)
    global_model = build_model(spec.model_size, BYTE_VOCAB_SIZE, spec.seq_len, spec.seed)
    layout = ParamLayout.of(global_model)
    theta = layout.flatten(global_model)
    outer = OuterOptimizer(spec.outer_lr, spec.outer_momentum, spec.outer_nesterov, torch.zeros_like(theta))
    replicas = [
        build_model(spec.model_size, BYTE_VOCAB_SIZE, spec.seq_len, spec.seed) for _ in range(workers)
    ]
    trainers = [InnerTrainer(m, spec, None, torch.device("cpu")) for m in replicas]
    readers = [shard_reader(spec, corpus.train, num_shards) for _ in range(workers)]
    residuals = [torch.zeros_like(theta) for _ in range(workers)]
    spans = _split_like_the_data_plane(theta, workers + 1)  # the coordinator reduces a span too
    initial = evaluate(global_model, evals_data)
    result = SimulationResult(
        workers, rounds, spec.inner_steps, spec.codec, spec.error_feedback, spec.outer_lr, 0, initial, initial
    )
    for r in range(rounds):
        sent_by_worker: list[torch.Tensor] = []
        for w in range(workers):
            if w in absent:
                continue
            layout.load_into(replicas[w], theta)
            readers[w].start(order[(r * workers + w) % num_shards])
            trainers[w].sampler = readers[w]
            trainers[w].run(spec.inner_steps)
            outgoing = torch.sub(theta, layout.flatten(replicas[w]))
            if w in attacks:
                outgoing = _attacked(outgoing, attacks[w], seed=r * workers + w)
            if spec.error_feedback:
                outgoing.add_(residuals[w])
            sent = _quantise(spec.codec, outgoing, spans)
            if spec.error_feedback:
                residuals[w] = outgoing - sent
            sent_by_worker.append(sent)
        # Equal tokens per worker: every weight is the same.
        reduced = reduce_like_the_data_plane(policy, sent_by_worker, [1.0] * len(sent_by_worker), spans)
        average = _quantise(spec.codec, reduced, spans)
        outer.step(theta, average)
        result.tokens += len(sent_by_worker) * tokens_per_round
        if (r + 1) % eval_every == 0 or r == rounds - 1:
            layout.load_into(global_model, theta)
            loss = evaluate(global_model, evals_data)
            result.evals.append((result.tokens, loss))
            result.final_eval_loss = loss
            if not math.isfinite(loss):
                break
    result.seconds = time.perf_counter() - started
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="run spec field")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    fields: dict[str, object] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            fields[key] = json.loads(value)
        except json.JSONDecodeError:
            fields[key] = value  # a bare string
    spec = RunSpec.model_validate(fields)
    print(json.dumps(simulate(spec, args.workers, args.rounds, eval_every=args.eval_every).to_dict()))


if __name__ == "__main__":
    main()
