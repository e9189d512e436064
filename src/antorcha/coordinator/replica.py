"""The coordinator's own replica of the model: it applies every outer step like a worker does, so
the coordinator always holds θ_r to evaluate, checkpoint and serve to joiners."""

from __future__ import annotations

import threading

import torch

from antorcha.config import RunSpec
from antorcha.data import eval_batches, evaluate, shards_for_rounds
from antorcha.data.source import load_run_data
from antorcha.diloco.outer import OuterOptimizer
from antorcha.diloco.params import ParamLayout
from antorcha.diloco.pseudo_gradient import check_finite
from antorcha.diloco.state import GlobalState, encode_state, sha256_hex
from antorcha.model.factory import build_run_model


class CoordinatorReplica:
    def __init__(self, spec: RunSpec) -> None:
        self.spec = spec
        data = load_run_data(spec)  # the workers call the same function on the same spec
        corpus = data.corpus
        self.corpus_fingerprint = corpus.fingerprint
        self.num_data_shards = spec.num_data_shards or shards_for_rounds(
            corpus.train.numel(), spec.steps_per_shard * spec.tokens_per_step
        )
        self.model = build_run_model(spec, data.vocab_size)
        self.layout = ParamLayout.of(self.model)
        params = self.layout.flatten(self.model)
        self.state = GlobalState(0, params, torch.zeros_like(params))
        self.outer = OuterOptimizer(
            spec.outer_lr, spec.outer_momentum, spec.outer_nesterov, self.state.momentum
        )
        self.eval_set = eval_batches(corpus.eval, spec.seq_len, spec.batch_size, spec.eval_batches)
        self._lock = threading.Lock()
        self._encoded: tuple[int, bytes, str, str] | None = None

    @property
    def num_parameters(self) -> int:
        return self.layout.total

    def apply(self, average: torch.Tensor) -> str:
        """Outer step with the round's averaged pseudo-gradient; returns the new checksum."""
        check_finite(average, "averaged pseudo-gradient")
        with self._lock:
            self.outer.step(self.state.params, average)
            self.state.round += 1
            return self.state.checksum

    def skip(self) -> str:
        """A round closes with no update (nothing to average, or its average was rejected): θ_{r+1} = θ_r,
        outer momentum untouched. The round still advances, so whoever waits for θ_{r+1} gets it."""
        with self._lock:
            self.state.round += 1
            return self.state.checksum

    def restore(self, state: GlobalState) -> None:
        """Adopt a checkpointed state (parameters, outer momentum and round)."""
        with self._lock:
            self.state = state
            self.outer.momentum_buffer = state.momentum

    def evaluate(self) -> float:
        with self._lock:
            self.layout.load_into(self.model, self.state.params)
        return evaluate(self.model, self.eval_set)

    def encoded(self) -> tuple[int, bytes, str, str]:
        """(round, serialized state, its sha256, the parameters' checksum), cached until the next outer
        step. All four are taken under one lock: read apart, the next outer step (which updates the
        parameters in place) could land between them and pair one round's bytes with another's checksum."""
        with self._lock:
            if self._encoded is None or self._encoded[0] != self.state.round:
                data = encode_state(self.layout, self.state, self.spec.run_id)
                self._encoded = (self.state.round, data, sha256_hex(data), self.state.checksum)
            return self._encoded

    @property
    def checksum(self) -> str:
        with self._lock:
            return self.state.checksum
