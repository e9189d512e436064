"""Experiment specs: a TOML file that describes a family of runs, validated by pydantic.

Owns the spec's schema (``ExperimentSpec``: the run's settings, the token budget, the cluster, a plan
per worker with speed, link and join/leave/crash rounds, the data-parallel baseline, seeds and a sweep
over any field), reading it from TOML, and expanding it into named runs (``PlannedRun``) with stable
ids and hashes of everything that decides their outcome, which is what makes a sweep resumable.

A spec looks like this::

    name = "h_sweep"
    seeds = [0]
    [run]                      # any antorcha.config.RunSpec field
    model_size = "nano"
    seq_len = 64
    batch_size = 8
    [budget]
    steps_per_worker = 1000    # or: tokens = 1_024_000 (in all, over every worker)
    [cluster]
    workers = 2
    [[workers]]                # optional, one table per worker, in order
    slowdown = 3.0
    link = "100mbit/100ms"
    [sweep]
    "run.inner_steps" = [10, 50, 250]   # dotted paths; nested tables ([sweep.run]) work too

Sweep values form a cartesian product (with ``seeds``); each combination is one DiLoCo run on a local
cluster of real processes. Runs that would train the same data-parallel model share one baseline.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from antorcha.config import ConfigError, RunSpec
from antorcha.netem.links import parse_link

# The RunSpec fields that shape a data-parallel run. A baseline is shared by every DiLoCo run that
# agrees on these (and on workers and steps): H, the codec, the outer optimizer and links do not matter.
# The model and the data are the run's own (the baseline loads them as the workers do), so they count.
DDP_FIELDS = (
    "model_size",
    "hf_model",
    "hf_model_config",
    "tokenizer",
    "data",
    "seq_len",
    "batch_size",
    "inner_lr",
    "inner_weight_decay",
    "inner_warmup_steps",
    "inner_decay_steps",
    "grad_clip",
    "eval_batches",
    "corpus_max_bytes",
    "seed",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Budget(_Strict):
    """How much each run trains: give exactly one of the two."""

    tokens: int = Field(0, ge=0, description="Tokens in all (every worker together); 0 = use steps.")
    steps_per_worker: int = Field(0, ge=0, description="Inner steps each worker takes; 0 = use tokens.")
    decay: bool = Field(
        True, description="Cosine-decay the inner lr over the run (sets run.inner_decay_steps) in both arms."
    )

    @model_validator(mode="after")
    def _one_of(self) -> Budget:
        if (self.tokens > 0) == (self.steps_per_worker > 0):
            raise ValueError("give exactly one of budget.tokens and budget.steps_per_worker")
        return self


class ClusterPlan(_Strict):
    """The local cluster of real processes a DiLoCo run starts."""

    workers: int = Field(
        0,
        ge=0,
        le=64,
        description="Worker processes (the first ones use [[workers]]); 0 = one per "
        "[[workers]] table, or 2 without any.",
    )
    worker_threads: int = Field(1, ge=1, description="torch threads per worker process.")
    lease_s: float = Field(10.0, gt=0, description="Coordinator lease; generous, as 2 cores are shared.")
    start_timeout_s: float = Field(180.0, gt=0, description="Give up when the coordinator is not up by then.")
    run_timeout_s: float = Field(1800.0, gt=0, description="Give up on one run after this long.")


class WorkerPlan(_Strict):
    """One worker of the cluster: how fast it is, its link, and when it joins, leaves or crashes."""

    name: str = Field("", description="Process name; w<index> when empty.")
    slowdown: float = Field(1.0, ge=1.0, description="Each inner step takes this many times longer.")
    link: str = Field(
        "", description="Its data-plane link as '<bandwidth>/<rtt>', e.g. '100mbit/100ms' (paced in-app)."
    )
    join_round: int = Field(0, ge=0, description="Start the worker once the run reaches this round.")
    leave_round: int | None = Field(None, ge=0, description="SIGTERM it (graceful leave) at this round.")
    crash_round: int | None = Field(
        None, ge=0, description="It kills itself (kill -9) in this round's all-reduce (a fault plan)."
    )
    client_mode: bool = Field(False, description="Behind NAT: dials out only and reduces nothing.")

    @field_validator("link")
    @classmethod
    def _valid_link(cls, value: str) -> str:
        if value:
            parse_link(value)
        return value

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if value and not re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", value):
            raise ValueError("worker names are 1-40 characters of letters, digits, '_', '.', '-'")
        return value


class ExperimentSpec(_Strict):
    """A family of runs: one base setting, a sweep over some of its fields, and a baseline."""

    name: str = Field("experiment", description="Name of the experiment (the report's title).")
    description: str = Field("", description="What the experiment shows; copied into the report.")
    run: dict[str, Any] = Field(
        default_factory=dict, description="antorcha.config.RunSpec fields shared by every run."
    )
    budget: Budget = Field(
        default_factory=lambda: Budget(steps_per_worker=200), description="How much each run trains."
    )
    cluster: ClusterPlan = Field(default_factory=ClusterPlan, description="The local cluster.")
    workers: list[WorkerPlan] = Field(default_factory=list, description="Per-worker plans, in order.")
    baseline: bool = Field(True, description="Also train each setting with real DDP on equal tokens.")
    baseline_evals: int = Field(20, ge=1, le=1000, description="Eval points along the baseline's curve.")
    seeds: list[int] = Field(default_factory=list, description="Repeat every run per seed; empty = run.seed.")
    sweep: dict[str, list[Any]] = Field(
        default_factory=dict, description="Dotted field path -> values; runs are the cartesian product."
    )
    labels: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Dotted sweep path -> a display name per value (for run ids, tables and plots).",
    )

    @model_validator(mode="after")
    def _labels_match(self) -> ExperimentSpec:
        for path, names in self.labels.items():
            if path not in self.sweep:
                raise ValueError(f"labels {path!r}: no such sweep path")
            if len(names) != len(self.sweep[path]) or len(set(names)) != len(names):
                raise ValueError(f"labels {path!r}: give one distinct name per swept value")
        return self

    @field_validator("sweep", "labels", mode="before")
    @classmethod
    def _flatten(cls, value: Any) -> Any:
        # [sweep.run] inner_steps = [...] arrives as {"run": {"inner_steps": [...]}}: the same as
        # "run.inner_steps" = [...].
        if not isinstance(value, dict):
            return value
        flat: dict[str, Any] = {}

        def walk(prefix: str, node: dict[str, Any]) -> None:
            for key, sub in node.items():
                path = f"{prefix}.{key}" if prefix else str(key)
                if isinstance(sub, dict):
                    walk(path, sub)
                else:
                    flat[path] = sub

        walk("", value)
        return flat

    @field_validator("sweep")
    @classmethod
    def _non_empty(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for path, values in value.items():
            if not values:
                raise ValueError(f"sweep {path!r} has no values")
            if path.split(".")[0] in ("sweep", "seeds", "name", "description"):
                raise ValueError(f"sweep {path!r}: that field cannot be swept")
        return value

    @field_validator("run")
    @classmethod
    def _valid_run(cls, value: dict[str, Any]) -> dict[str, Any]:
        RunSpec.model_validate(value)  # unknown or invalid RunSpec fields fail here, by name
        return value


class PlannedRun(_Strict):
    """One run of an expanded sweep: everything needed to start it, and its identity."""

    run_id: str = Field(description="Stable id: the swept values (or the baseline's shape) as a slug.")
    kind: Literal["diloco", "ddp"]
    label: str = Field(description="Short human label for tables and plots, e.g. 'H=50' or 'DDP'.")
    params: dict[str, Any] = Field(description="The swept values of this run (dotted path -> value).")
    run: RunSpec
    cluster: ClusterPlan
    workers: list[WorkerPlan] = Field(description="One plan per worker, cluster.workers of them.")
    steps_per_worker: int
    rounds: int = Field(description="Rounds (DiLoCo) or eval points (DDP) the run will record.")
    tokens: int = Field(description="Tokens the run trains in all, as planned.")
    config_hash: str = Field(description="sha256 of everything above but the labels; a change means redo.")
    baseline_id: str = Field("", description="The DDP run this one is compared against.")
    baseline_evals: int = 20


def _set_path(data: dict[str, Any], path: str, value: Any) -> None:
    keys = path.split(".")
    node = data
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            if key in node or key not in ("run", "budget", "cluster"):
                raise ConfigError(f"sweep {path!r}: {key!r} is not a table of the spec")
            node[key] = {}
        node = node[key]
    node[keys[-1]] = value


def _slug(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return re.sub(r"[^A-Za-z0-9.]+", "", text)[:24] or "x"


def _label_part(path: str, value: Any) -> str:
    name = path.split(".")[-1]
    short = {"inner_steps": "H", "seed": "seed", "codec": "codec", "workers": "workers"}.get(name, name)
    if isinstance(value, list | dict):
        return f"{short}=#{hashlib.sha256(json.dumps(value).encode()).hexdigest()[:4]}"
    return f"{short}={value}"


def _hash(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _axes(spec: ExperimentSpec) -> dict[str, list[Any]]:
    axes = dict(spec.sweep)
    if spec.seeds:
        axes["run.seed"] = list(spec.seeds)
    return axes


def _combinations(axes: dict[str, list[Any]]) -> list[dict[str, Any]]:
    paths = list(axes)
    return [dict(zip(paths, values, strict=True)) for values in itertools.product(*axes.values())]


def _worker_plans(spec: ExperimentSpec) -> list[WorkerPlan]:
    count = spec.cluster.workers or len(spec.workers) or 2
    plans = list(spec.workers[:count])
    plans += [WorkerPlan() for _ in range(count - len(plans))]
    named = [p if p.name else p.model_copy(update={"name": f"w{i}"}) for i, p in enumerate(plans)]
    if len({p.name for p in named}) != len(named):
        raise ConfigError("worker names must be unique")
    if not any(p.join_round == 0 for p in named):
        raise ConfigError("at least one worker must join at round 0")
    return named


def _diloco_run(
    spec: ExperimentSpec, params: dict[str, Any], varying: set[str], names: dict[str, str]
) -> PlannedRun:
    workers = _worker_plans(spec)
    # The budget is planned for the workers present from round 0; late joiners add, crashes take away.
    initial = sum(1 for w in workers if w.join_round == 0)
    base = RunSpec.model_validate(spec.run)
    tokens_per_step = base.tokens_per_step
    steps = spec.budget.steps_per_worker or spec.budget.tokens // (initial * tokens_per_step)
    rounds = steps // base.inner_steps
    if rounds < 1:
        raise ConfigError(
            f"run {params or ''}: the budget gives {steps} steps per worker, "
            f"fewer than H = {base.inner_steps}"
        )
    steps = rounds * base.inner_steps  # whole rounds only, so both arms train exactly the same tokens
    updates: dict[str, Any] = {
        "max_rounds": rounds,
        "min_workers": initial,
    }
    if spec.budget.decay:
        updates["inner_decay_steps"] = steps
    run = RunSpec.model_validate({**spec.run, **updates})
    # Only axes with more than one value tell runs apart; a lone seed would only lengthen every name.
    shown = {p: v for p, v in params.items() if p in varying}
    slug = "_".join(
        _slug(names[p]) if p in names else f"{p.split('.')[-1]}-{_slug(v)}" for p, v in shown.items()
    )
    label = ", ".join(names.get(p) or _label_part(p, v) for p, v in shown.items())
    slug, label = slug or "run", label or spec.name
    identity = {
        "kind": "diloco",
        "run": run.model_dump(),
        "cluster": spec.cluster.model_dump(),
        "workers": [w.model_dump() for w in workers],
        "steps": steps,
    }
    return PlannedRun(
        run_id=slug,
        kind="diloco",
        label=label,
        params=params,
        run=run.model_copy(update={"run_id": slug}),
        cluster=spec.cluster,
        workers=workers,
        steps_per_worker=steps,
        rounds=rounds,
        tokens=steps * initial * tokens_per_step,
        config_hash=_hash(identity),
    )


def _baseline_for(run: PlannedRun, evals: int) -> PlannedRun:
    fields = {k: getattr(run.run, k) for k in DDP_FIELDS}
    ddp_spec = RunSpec.model_validate(fields)
    # As many ranks as workers start the DiLoCo run, so both train the same planned tokens.
    workers = run.run.min_workers
    identity = {"kind": "ddp", "run": ddp_spec.model_dump(), "workers": workers}
    identity["steps"] = run.steps_per_worker
    config_hash = _hash(identity)
    run_id = f"ddp-w{workers}-s{run.run.seed}-{config_hash[:8]}"
    return PlannedRun(
        run_id=run_id,
        kind="ddp",
        label="DDP",
        params={},
        run=ddp_spec.model_copy(update={"run_id": run_id}),
        cluster=run.cluster,
        workers=[w for w in run.workers if w.join_round == 0],
        steps_per_worker=run.steps_per_worker,
        rounds=min(evals, run.steps_per_worker),
        tokens=run.tokens,
        config_hash=config_hash,
        baseline_evals=evals,
    )


def expand(spec: ExperimentSpec) -> list[PlannedRun]:
    """The runs of `spec`: baselines first (each once), then one DiLoCo run per sweep combination.

    Raises ConfigError naming the run and field when a combination is not a valid run.
    """
    diloco: list[PlannedRun] = []
    baselines: dict[str, PlannedRun] = {}
    base = spec.model_dump(exclude={"sweep", "seeds", "labels"})
    axes = _axes(spec)
    varying = {p for p, values in axes.items() if len(values) > 1}
    for params in _combinations(axes):
        data = copy.deepcopy(base)
        for path, value in params.items():
            _set_path(data, path, value)
        try:
            variant = ExperimentSpec.model_validate(data)
        except ValidationError as e:
            raise ConfigError(f"sweep point {params}: {_describe(e)}") from None
        names = {p: spec.labels[p][spec.sweep[p].index(v)] for p, v in params.items() if p in spec.labels}
        run = _diloco_run(variant, params, varying, names)
        if spec.baseline:
            ddp = _baseline_for(run, spec.baseline_evals)
            baselines.setdefault(ddp.run_id, ddp)
            run = run.model_copy(update={"baseline_id": ddp.run_id})
        diloco.append(run)
    ids = [r.run_id for r in diloco]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"two sweep points give the same run id: {sorted(ids)}")
    return [*baselines.values(), *diloco]


def _describe(err: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())


def parse_spec(text: str, source: str = "<spec>") -> ExperimentSpec:
    """Parse and validate a spec; ConfigError names the file and the field on any problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"experiment spec {source} is not valid TOML: {e}") from None
    try:
        spec = ExperimentSpec.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"invalid experiment spec ({source}): {_describe(e)}") from None
    expand(spec)  # every sweep point must be a valid run before anything starts
    return spec


def load_spec(path: str | Path) -> tuple[ExperimentSpec, str]:
    """The spec in `path` and its text (kept next to the results, so a report says what was run)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"experiment spec {path} cannot be read: {e}") from None
    return parse_spec(text, str(path)), text
