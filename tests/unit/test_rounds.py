"""The coordinator's round state machine and data shard assignment: pure functions of events and the clock."""

from __future__ import annotations

from antorcha.coordinator.rounds import Phase, Report, RoundMachine


def _report(worker_id: str, tokens: int = 1000) -> Report:
    return Report(worker_id=worker_id, tokens=tokens, inner_steps=10, train_loss=2.5, compute_seconds=1.0)


def _training(max_rounds: int = 0, deadline_s: float = 60.0) -> RoundMachine:
    """A machine needing two workers whose round 0 opened at t=0 with workers a and b."""
    machine = RoundMachine(max_rounds=max_rounds, min_workers=2, deadline_s=deadline_s)
    machine.tick(0.0, {"a", "b"})
    assert machine.phase == Phase.TRAINING
    return machine


def test_waits_until_enough_workers_then_opens_round_zero() -> None:
    machine = RoundMachine(max_rounds=0, min_workers=2, deadline_s=60.0)
    decision = machine.tick(1.0, {"a"})
    assert not decision.form_group
    assert machine.phase == Phase.WAITING
    assert "1/2" in decision.reason

    decision = machine.tick(5.0, {"a", "b"})
    assert not decision.form_group
    assert machine.phase == Phase.TRAINING
    assert machine.round == 0
    assert machine.opened_at == 5.0
    assert "opened" in decision.reason


def test_group_forms_when_every_active_worker_reported() -> None:
    machine = _training()
    assert machine.report(0, _report("b"))[0]
    decision = machine.tick(1.0, {"a", "b"})
    assert not decision.form_group, "a has not reported yet"
    assert machine.phase == Phase.TRAINING

    assert machine.report(0, _report("a"))[0]
    decision = machine.tick(2.0, {"a", "b"})
    assert decision.form_group
    assert decision.members == ("a", "b")  # sorted, whatever the report order
    assert machine.group == ("a", "b")
    assert machine.phase == Phase.AVERAGING


def test_deadline_forms_group_of_reporters_and_names_the_missing() -> None:
    machine = _training(deadline_s=30.0)
    machine.report(0, _report("a"))
    assert not machine.tick(29.9, {"a", "b"}).form_group
    decision = machine.tick(30.0, {"a", "b"})
    assert decision.form_group
    assert decision.members == ("a",)
    assert "'b'" in decision.reason


def test_deadline_without_any_report_keeps_waiting() -> None:
    machine = _training(deadline_s=10.0)
    decision = machine.tick(1000.0, {"a", "b"})
    assert not decision.form_group
    assert machine.phase == Phase.TRAINING


def test_reports_of_workers_no_longer_active_are_left_out() -> None:
    machine = _training()
    machine.report(0, _report("a"))
    machine.report(0, _report("b"))
    decision = machine.tick(1.0, {"a", "c"})  # b lost its lease, c joined and has not reported
    assert not decision.form_group
    decision = machine.tick(100.0, {"a", "c"})
    assert decision.form_group
    assert decision.members == ("a",)


def test_worker_that_left_no_longer_blocks_the_group() -> None:
    machine = _training()
    machine.report(0, _report("a"))
    decision = machine.tick(1.0, {"a"})  # b left: everyone still active has reported
    assert decision.form_group
    assert decision.members == ("a",)


def test_report_for_wrong_round_or_phase_is_refused() -> None:
    machine = RoundMachine(max_rounds=0, min_workers=1, deadline_s=60.0)
    ok, reason = machine.report(0, _report("a"))
    assert not ok, "no round trains while waiting"
    assert "waiting" in reason

    machine.tick(0.0, {"a", "b"})
    ok, reason = machine.report(3, _report("a"))
    assert not ok
    assert "round 3" in reason and "round 0" in reason

    assert machine.report(0, _report("a"))[0]
    assert machine.tick(1.0, {"a"}).form_group
    ok, reason = machine.report(0, _report("b"))
    assert not ok
    assert "without you" in reason
    assert "b" not in machine.reports


def test_ticks_during_averaging_decide_nothing() -> None:
    machine = _training()
    machine.report(0, _report("a"))
    machine.report(0, _report("b"))
    assert machine.tick(1.0, {"a", "b"}).form_group
    again = machine.tick(2.0, {"a", "b"})
    assert not again.form_group
    assert machine.phase == Phase.AVERAGING
    assert machine.group == ("a", "b")


def test_close_opens_next_round_and_clears_reports() -> None:
    machine = _training()
    machine.report(0, _report("a"))
    machine.report(0, _report("b"))
    machine.tick(1.0, {"a", "b"})
    reason = machine.close(7.0, {"a", "b"})
    assert machine.round == 1
    assert machine.phase == Phase.TRAINING
    assert machine.opened_at == 7.0
    assert machine.reports == {}
    assert machine.group == ()
    assert "round 1 opened" in reason
    # The new round's deadline runs from its opening, not from round 0's.
    machine.report(1, _report("a"))
    assert not machine.tick(7.0 + 59.0, {"a", "b"}).form_group
    assert machine.tick(7.0 + 60.0, {"a", "b"}).form_group


def test_after_round_zero_a_round_goes_on_with_fewer_than_min_workers() -> None:
    machine = _training()
    machine.report(0, _report("a"))
    machine.tick(100.0, {"a", "b"})
    machine.close(101.0, {"a"})
    assert machine.phase == Phase.TRAINING, "min_workers gates only the start of the run"
    assert machine.round == 1


def test_close_waits_when_no_worker_remains() -> None:
    machine = _training()
    machine.report(0, _report("a"))
    machine.tick(100.0, {"a", "b"})
    machine.close(101.0, set())
    assert machine.phase == Phase.WAITING
    assert machine.round == 1
    machine.tick(102.0, {"c"})
    assert machine.phase == Phase.TRAINING
    assert machine.opened_at == 102.0


def test_run_finishes_after_max_rounds() -> None:
    machine = _training(max_rounds=2)
    for round_ in range(2):
        assert machine.phase == Phase.TRAINING
        machine.report(round_, _report("a"))
        machine.report(round_, _report("b"))
        assert machine.tick(float(round_), {"a", "b"}).form_group
        reason = machine.close(float(round_) + 0.5, {"a", "b"})
    assert machine.phase == Phase.FINISHED
    assert machine.round == 2
    assert "finished after 2 rounds" in reason
    ok, reason = machine.report(2, _report("a"))
    assert not ok
    assert "finished" in reason
    assert not machine.tick(10.0, {"a", "b"}).form_group


def test_zero_max_rounds_runs_on() -> None:
    machine = _training(max_rounds=0)
    for _ in range(5):
        machine.close(0.0, {"a", "b"})
    assert machine.phase == Phase.TRAINING
    assert machine.round == 5


# ---- operator pause / resume ---------------------------------------------------------------------


def test_pause_lets_the_round_in_flight_finish_then_holds_the_next() -> None:
    machine = _training()
    changed, reason = machine.pause()
    assert changed and "round 0 finishes" in reason
    assert machine.phase == Phase.TRAINING  # the round in flight goes on
    machine.report(0, _report("a"))
    machine.report(0, _report("b"))
    assert machine.tick(1.0, {"a", "b"}).form_group
    reason = machine.close(2.0, {"a", "b"})
    assert machine.phase == Phase.PAUSED and machine.round == 1
    assert "paused" in reason
    decision = machine.tick(100.0, {"a", "b"})
    assert not decision.form_group and "opens on resume" in decision.reason
    assert machine.phase == Phase.PAUSED and machine.round == 1
    ok, why = machine.report(1, _report("a"))
    assert not ok and "paused" in why


def test_resume_opens_the_held_round_at_the_next_tick() -> None:
    machine = RoundMachine(max_rounds=0, min_workers=1, deadline_s=60.0)
    assert machine.pause() == (True, "paused; round 0 opens on resume")  # waiting: paused at once
    assert machine.phase == Phase.PAUSED
    assert machine.pause()[0] is False  # idempotent
    changed, reason = machine.resume()
    assert changed and "resumed" in reason
    assert machine.phase == Phase.WAITING
    machine.tick(5.0, {"a"})
    assert machine.phase == Phase.TRAINING and machine.opened_at == 5.0
    assert machine.resume() == (False, "not paused")


def test_resume_before_the_round_ends_cancels_the_pause() -> None:
    machine = _training()
    machine.pause()
    assert machine.resume()[0]
    machine.report(0, _report("a"))
    machine.report(0, _report("b"))
    machine.tick(1.0, {"a", "b"})
    machine.close(2.0, {"a", "b"})
    assert machine.phase == Phase.TRAINING and machine.round == 1


def test_a_finished_run_cannot_be_paused_and_the_last_round_finishes_it() -> None:
    machine = _training(max_rounds=1)
    machine.pause()
    machine.report(0, _report("a"))
    machine.report(0, _report("b"))
    machine.tick(1.0, {"a", "b"})
    machine.close(2.0, {"a", "b"})
    assert machine.phase == Phase.FINISHED  # max_rounds wins over the pause
    assert machine.pause() == (False, "the run is finished")
