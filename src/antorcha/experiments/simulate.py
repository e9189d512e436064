"""DiLoCo in one process, for tuning before launching real clusters: the same model, inner trainer,
codecs (per-span quantisation with error feedback), weighted average and outer optimizer as the
distributed system, with the workers run one after another. No network, no coordinator: use it to
pick an outer learning rate or sweep H quickly; measure bytes and wall time on a real cluster.

Data: worker w trains in round r on the (r·W + w)-th shard of the data ledger's seeded permutation,
read front to back, as a real run's ledger hands them out (neighbouring shards hold neighbouring
files, so taking them in order would make every round's data far from i.i.d.).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from itertools import pairwise

import torch

from antorcha.averaging.codecs import roundtrip
from antorcha.config import RunSpec
from antorcha.coordinator.ledger import DataLedger
from antorcha.data import BYTE_VOCAB_SIZE, ShardReader, eval_batches, evaluate, load_stdlib_corpus
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


def simulate(spec: RunSpec, workers: int, rounds: int, *, eval_every: int = 1) -> SimulationResult:
    """Run `rounds` DiLoCo rounds of `workers` workers with `spec` and return the eval-loss curve."""
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
    readers = [ShardReader(corpus.train, num_shards, spec.seq_len, spec.batch_size) for _ in range(workers)]
    residuals = [torch.zeros_like(theta) for _ in range(workers)]
    spans = _split_like_the_data_plane(theta, workers + 1)  # the coordinator reduces a span too
    initial = evaluate(global_model, evals_data)
    result = SimulationResult(
        workers, rounds, spec.inner_steps, spec.codec, spec.error_feedback, spec.outer_lr, 0, initial, initial
    )
    for r in range(rounds):
        total = torch.zeros_like(theta)
        for w in range(workers):
            layout.load_into(replicas[w], theta)
            readers[w].start(order[(r * workers + w) % num_shards])
            trainers[w].sampler = readers[w]
            trainers[w].run(spec.inner_steps)
            outgoing = torch.sub(theta, layout.flatten(replicas[w]))
            if spec.error_feedback:
                outgoing.add_(residuals[w])
            sent = _quantise(spec.codec, outgoing, spans)
            if spec.error_feedback:
                residuals[w] = outgoing - sent
            total.add_(sent)  # equal tokens per worker: the token-weighted mean is the plain mean
        average = _quantise(spec.codec, total / workers, spans)
        outer.step(theta, average)
        result.tokens += workers * tokens_per_round
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
