"""Experiment specs: validation names the field, sweeps expand into stable runs with equal-token
baselines, the committed specs are valid, and the output folder's resume rule keeps only done runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from antorcha.config import ConfigError
from antorcha.experiments.report import RunResult, summarize
from antorcha.experiments.runner import DONE, RESULTS, prepare_out, read_rows, run_dir
from antorcha.experiments.spec import expand, load_spec, parse_spec

REPO = Path(__file__).resolve().parents[2]

BASE = """
name = "t"
[run]
model_size = "nano"
seq_len = 32
batch_size = 4
[budget]
steps_per_worker = 100
"""


def test_sweep_expands_to_the_cartesian_product_with_one_shared_baseline() -> None:
    spec = parse_spec(BASE + '[sweep]\n"run.inner_steps" = [10, 50]\n"run.codec" = ["none", "int8"]\n')
    runs = expand(spec)
    ddp = [r for r in runs if r.kind == "ddp"]
    diloco = [r for r in runs if r.kind == "diloco"]
    assert len(ddp) == 1 and runs[0] is ddp[0], "one baseline, listed first"
    assert [(r.run.inner_steps, r.run.codec) for r in diloco] == [
        (10, "none"),
        (10, "int8"),
        (50, "none"),
        (50, "int8"),
    ]
    assert {r.baseline_id for r in diloco} == {ddp[0].run_id}
    assert diloco[0].label == "H=10, codec=none"
    assert len({r.run_id for r in runs}) == len(runs)


def test_both_arms_train_equal_whole_rounds_of_tokens() -> None:
    # 100 steps is not a multiple of H = 30: both arms train 3 whole rounds = 90 steps per worker.
    spec = parse_spec(BASE + "[sweep.run]\ninner_steps = [30]\n")
    ddp, run = expand(spec)
    assert run.rounds == 3 and run.run.max_rounds == 3 and run.steps_per_worker == 90
    assert ddp.steps_per_worker == 90 and ddp.tokens == run.tokens == 90 * 2 * 4 * 32
    assert run.run.inner_decay_steps == 90 == ddp.run.inner_decay_steps


def test_token_budget_divides_over_the_workers_present_from_round_0() -> None:
    spec = parse_spec(
        BASE.replace("steps_per_worker = 100", "tokens = 12800")
        + "[run2]\n".replace("[run2]\n", "")
        + '[[workers]]\nname = "a"\n[[workers]]\nname = "b"\njoin_round = 2\n'
    )
    (ddp, run) = expand(spec)
    assert [w.name for w in run.workers] == ["a", "b"]
    assert run.run.min_workers == 1 and ddp.run.run_id.startswith("ddp-w1-")
    assert run.steps_per_worker == 12800 // (1 * 4 * 32) // 20 * 20  # whole rounds of the default H = 20
    assert ddp.tokens == run.tokens


def test_ids_are_stable_and_hashes_follow_every_setting() -> None:
    text = BASE + "[sweep.run]\ninner_steps = [10, 20]\n"
    first, again = expand(parse_spec(text)), expand(parse_spec(text))
    assert [(r.run_id, r.config_hash) for r in first] == [(r.run_id, r.config_hash) for r in again]
    changed = expand(parse_spec(text.replace("batch_size = 4", "batch_size = 8")))
    assert [r.run_id for r in changed][1:] == [r.run_id for r in first][1:]
    assert all(a.config_hash != b.config_hash for a, b in zip(first, changed, strict=True))
    # A worker's link does not change the data-parallel baseline, only the DiLoCo runs.
    linked = expand(parse_spec(text + '[cluster]\nworkers = 2\n[[workers]]\nlink = "10mbit/50ms"\n'))
    assert linked[0].config_hash == first[0].config_hash
    assert linked[1].config_hash != first[1].config_hash


def test_runs_on_other_data_or_models_get_their_own_baseline() -> None:
    # The baseline trains the run's own data, tokenizer and model, so these tell baselines apart.
    text = BASE + '[run.data]\nsource = "text"\npaths = ["a.txt"]\n'
    swept = expand(parse_spec(text + '[sweep]\n"run.data.paths" = [["a.txt"], ["b.txt"]]\n'))
    ddp = [r for r in swept if r.kind == "ddp"]
    diloco = [r for r in swept if r.kind == "diloco"]
    assert len(ddp) == 2 and len({r.config_hash for r in ddp}) == 2 and len({r.run_id for r in ddp}) == 2
    assert [r.run.data.paths for r in ddp] == [["a.txt"], ["b.txt"]]
    assert [r.baseline_id for r in diloco] == [r.run_id for r in ddp]
    builtin = expand(parse_spec(BASE))[0]
    on_file = expand(parse_spec(text))[0]
    assert builtin.kind == on_file.kind == "ddp" and on_file.run.data.source == "text"
    assert on_file.config_hash != builtin.config_hash
    window_order = expand(parse_spec(BASE + '[run.data]\nwindow_order = "contiguous"\n'))[0]
    assert window_order.run.data.window_order == "contiguous"
    assert window_order.config_hash != builtin.config_hash
    for extra in ('tokenizer = "some/tokenizer"\n', 'hf_model = "some/model"\n'):
        other = expand(parse_spec(BASE.replace("[run]\n", "[run]\n" + extra)))[0]
        assert other.kind == "ddp" and other.config_hash != builtin.config_hash, extra
    llama = expand(parse_spec(BASE + '[run.hf_model_config]\nmodel_type = "llama"\n'))[0]
    assert llama.run.hf_model_config == {"model_type": "llama"}
    assert llama.config_hash != builtin.config_hash


def test_labels_name_runs_and_a_lone_seed_does_not_lengthen_ids() -> None:
    labels = '[labels]\n"run.overlap" = ["blocking", "overlap"]\n'
    spec = parse_spec("seeds = [3]\n" + BASE + "[sweep.run]\noverlap = [false, true]\n" + labels)
    runs = expand(spec)
    assert [r.run_id for r in runs[1:]] == ["blocking", "overlap"]
    assert all(r.run.seed == 3 for r in runs)
    two_seeds = expand(parse_spec("seeds = [1, 2]\n" + BASE))
    assert [r.label for r in two_seeds if r.kind == "diloco"] == ["seed=1", "seed=2"]
    assert len([r for r in two_seeds if r.kind == "ddp"]) == 2, "a baseline per seed"


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ("[sweep.run]\ninner_stepz = [1]\n", "inner_stepz"),
        ("[sweep.run]\ninner_steps = []\n", "no values"),
        ("[sweep.run]\ncodec = ['int9']\n", "codec"),
        ("[cluster]\nworkerz = 2\n", "workerz"),
        ('[[workers]]\nlink = "fast"\n', "link"),
        ("[[workers]]\njoin_round = 1\n", "round 0"),
        ('[labels]\n"run.codec" = ["a"]\n', "no such sweep path"),
        ("[sweep.run]\ninner_steps = [500]\n", "fewer than H"),
    ],
)
def test_invalid_specs_fail_with_the_field_named(extra: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        parse_spec(BASE + extra)


def test_budget_needs_exactly_one_of_tokens_and_steps() -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        parse_spec(BASE.replace("steps_per_worker = 100", "steps_per_worker = 100\ntokens = 5"))


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("*.toml")), ids=lambda p: p.name)
def test_committed_specs_are_valid(path: Path) -> None:
    spec, _ = load_spec(path)
    runs = expand(spec)
    assert any(r.kind == "ddp" for r in runs) and any(r.kind == "diloco" for r in runs)
    assert all(r.baseline_id for r in runs if r.kind == "diloco")


def test_h_sweep_plans_ddp_and_three_h_values_on_equal_tokens() -> None:
    spec, _ = load_spec(REPO / "experiments" / "h_sweep.toml")
    runs = expand(spec)
    assert [r.label for r in runs] == ["DDP", "H=10", "H=50", "H=250"]
    assert len({r.tokens for r in runs}) == 1
    assert min(r.rounds for r in runs if r.kind == "diloco") >= 3


def test_prepare_out_keeps_only_rows_of_runs_done_with_their_current_hash(tmp_path: Path) -> None:
    runs = expand(parse_spec(BASE + "[sweep.run]\ninner_steps = [10, 20]\n"))
    ddp, done, stale = runs
    for run in runs:
        run_dir(tmp_path, run).mkdir(parents=True)
    (run_dir(tmp_path, ddp) / DONE).write_text(json.dumps({"config_hash": ddp.config_hash}))
    (run_dir(tmp_path, done) / DONE).write_text(json.dumps({"config_hash": done.config_hash}))
    (run_dir(tmp_path, stale) / DONE).write_text(json.dumps({"config_hash": "from an older spec"}))
    rows = [{"run_id": r.run_id, "round": 0} for r in runs] + [{"run_id": "gone", "round": 0}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"run_id": "cut short by a ki'
    (tmp_path / RESULTS).write_text(text)
    assert prepare_out(tmp_path, "spec", runs) == {ddp.run_id, done.run_id}
    assert [r["run_id"] for r in read_rows(tmp_path)] == [ddp.run_id, done.run_id]
    assert (tmp_path / "spec.toml").read_text() == "spec"


def test_summary_compares_at_equal_tokens_against_the_baseline() -> None:
    def result(run_id: str, kind: str, points: list[tuple[int, float, int]], h: int | None) -> RunResult:
        plan = {"run": {"inner_steps": h or 1, "codec": "none"}, "workers": [{}, {}], "baseline_id": "b"}
        rows = [
            {"round": i, "tokens": t, "eval_loss": loss, "bytes": b, "elapsed_s": float(i)}
            for i, (t, loss, b) in enumerate(points)
        ]
        record = {"initial_eval_loss": 5.0, "wall_s": 1.0, "replicas_consistent": True, "utilisation": 0.5}
        return RunResult(run_id, kind, run_id, plan, record, rows)

    base = result("b", "ddp", [(100, 3.0, 10_000), (200, 2.0, 20_000)], None)
    # Reaches 150 tokens only (a crash): both are compared at 150 tokens, interpolated.
    arm = result("h10", "diloco", [(150, 2.75, 150)], 10)
    table = {t["run_id"]: t for t in summarize([base, arm])}
    assert table["h10"]["equal_tokens"] == 150
    assert table["b"]["eval_loss_at_equal_tokens"] == pytest.approx(2.5)
    assert table["h10"]["loss_gap_vs_baseline"] == pytest.approx(2.75 / 2.5 - 1)
    assert table["h10"]["traffic_reduction_vs_baseline"] == pytest.approx(100.0)
    assert table["h10"]["reduction_over_h"] == pytest.approx(10.0)
