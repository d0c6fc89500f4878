"""emlib.timing: phases nest exclusively, the tally is saved by a chapter's last cell, a run's table sums them."""
import json
import os

import pytest

from emlib import book, timing


@pytest.fixture
def clock(monkeypatch):
    """A clock that moves only when the test says so."""
    now = [100.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])
    timing.reset()
    yield now
    timing.reset()


def test_nested_phases_count_once_for_the_innermost(clock):
    @timing.timed("judge")
    def judge():
        clock[0] += 2.0

    with timing.phase("sample"):
        clock[0] += 3.0
        judge()
        clock[0] += 1.0
        with timing.phase("metrics"):
            clock[0] += 0.5
    clock[0] += 10.0  # outside every phase
    t = timing.tally()
    assert t["sample"] == 4.0 and t["judge"] == 2.0 and t["metrics"] == 0.5 and t["load"] == 0.0
    s = timing.summary(wall=20.0)
    assert s["other"] == 13.5 and s["wall"] == 20.0


def test_an_open_phase_counts_up_to_now_and_errors_close_it(clock):
    with pytest.raises(RuntimeError):
        with timing.phase("train"):
            clock[0] += 1.0
            assert timing.tally()["train"] == 1.0
            raise RuntimeError("boom")
    clock[0] += 5.0
    assert timing.tally()["train"] == 1.0
    with pytest.raises(ValueError, match="unknown phase 'decode'"):
        with timing.phase("decode"):
            pass


def test_a_chapters_last_cell_saves_its_phases(tmp_path, clock):
    with timing.phase("sample"):
        clock[0] += 7.0
    out = tmp_path / "logs" / "phases" / "02_one_direction.json"
    table = book.executed_with(start_time=book.time.time() - 30, save=out)
    saved = json.loads(out.read_text())
    assert saved["sample"] == 7.0 and saved["wall"] >= 30 and saved["other"] >= 22
    assert table.loc["  of which sample (s)", "value"] == "7"


def test_a_runs_table_sums_chapters_and_finetunes_once_per_process(tmp_path):
    run = tmp_path / "run"
    (run / "logs" / "phases").mkdir(parents=True)
    (run / "logs" / "phases" / "02_one_direction.json").write_text(json.dumps(
        {"load": 5.0, "sample": 40.0, "judge": 10.0, "other": 5.0, "wall": 60.0}))
    group = {"load": 3.0, "train": 100.0, "other": 2.0, "wall": 105.0}
    # before 2026-12-06 each member's tally was read separately: the last digit could differ (counted once anyway)
    jobs = {"vector-a": {"job": "vector-a", "seconds": 105.0, "phases": group, "group": 2, "ended_s": 130.0,
                         "train_seconds": 99.5},
            "vector-b": {"job": "vector-b", "seconds": 105.0, "phases": group | {"other": 2.001}, "group": 2,
                         "ended_s": 130.0, "train_seconds": 99.5},
            "lora-old": {"job": "lora-old", "seconds": 50.0, "train_seconds": 40.0}}  # recorded without phases
    (run / "record.json").write_text(json.dumps({"timings": {"jobs": jobs}}))
    t = timing.run_table(run)
    assert list(t.columns) == ["02_one_direction", "finetunes", "all processes"]
    assert t.loc["train", "finetunes"] == 140.0 and t.loc["other", "finetunes"] == 12.0
    assert t.loc["wall", "all processes"] == 60.0 + 155.0
    assert t.loc["sample", "02_one_direction"] == 40.0 and t.loc["metrics", "all processes"] == 0.0
    with pytest.raises(FileNotFoundError, match="neither logs/phases"):
        timing.run_table(tmp_path / "empty")


def test_a_runs_timeline_has_one_row_per_process_with_its_memory(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    group = {"load": 3.0, "train": 100.0, "other": 2.0, "wall": 105.0}
    mem = {"peak_gib": 30.9, "peak_allocated_gib": 9.5, "held_gib": {"allocated": 0.44, "reserved": 0.53}}
    jobs = {"vector-a": {"seconds": 105.0, "ended_s": 125.0, "phases": group, "group": 2} | mem,
            "vector-b": {"seconds": 105.0, "ended_s": 125.0, "phases": group, "group": 2} | mem,
            "lora-c": {"seconds": 50.0, "ended_s": 70.0, "phases": {"train": 45.0, "wall": 50.0}, "peak_gib": None},
            "lora-old": {"seconds": 40.0, "train_seconds": 35.0}}  # an older run: no end, no memory
    chapters = {"02_one_direction": {"seconds": 60.0, "returncode": 0, "ready_s": 70.0, "started_s": 82.5,
                                     "ended_s": 142.5}}
    (run / "record.json").write_text(json.dumps({"timings": {"jobs": jobs, "chapters": chapters}}))
    t = timing.run_timeline(run)
    assert list(t["name"]) == ["vector-a (+1)", "lora-c", "02_one_direction", "lora-old"]  # by start; unknown last
    g = t.iloc[0]
    assert (g["members"], g["started_s"], g["ended_s"], g["peak_gib"], g["peak_allocated_gib"], g["held_gib"]) == (
        2, 20.0, 125.0, 30.9, 9.5, 0.53)
    ch = t[t["kind"] == "chapter"].iloc[0]
    assert (ch["ready_s"], ch["started_s"]) == (70.0, 82.5)
    assert t.iloc[3]["started_s"] is None or t.iloc[3]["started_s"] != t.iloc[3]["started_s"]  # None / NaN
    with pytest.raises(FileNotFoundError, match="record.json does not exist"):
        timing.run_timeline(tmp_path / "empty")


def test_a_process_sharing_its_gpu_gives_back_memory_between_phases(clock, monkeypatch):
    """Under ``models.shared_gpu`` (a run of record sets it for its processes) the cached GPU memory goes back
    each time the process leaves its outermost phase, not inside nested ones; elsewhere never."""
    from emlib import models

    calls = []
    monkeypatch.setattr(timing, "_between_phases", lambda: calls.append(len(timing._stack)))
    monkeypatch.delenv(timing.SHARED_GPU, raising=False)
    with timing.phase("sample"):
        pass
    assert calls == []
    with models.shared_gpu():
        with timing.phase("sample"):
            with timing.phase("judge"):
                pass
            assert calls == []  # the judge ended inside sampling
        with timing.phase("metrics"):
            pass
    assert calls == [0, 0]
    assert timing.SHARED_GPU not in os.environ  # restored
    models.give_back_gpu_memory()  # no CUDA here: nothing to give back, no error


def test_outermost_phases_are_kept_as_spans_on_the_runs_clock(tmp_path, clock, monkeypatch):
    """Each outermost phase's wall-clock span is saved beside the totals; the run's table does not count that
    file, and phase_spans puts the spans on the run's clock (record.json's t0_unix)."""
    wall = [1000.0]
    monkeypatch.setattr(timing.time, "time", lambda: wall[0])
    with timing.phase("load"):
        wall[0] += 4.0
    wall[0] += 10.0  # between phases: no span
    with timing.phase("sample"):
        wall[0] += 3.0
        with timing.phase("judge"):  # nested: inside the sample span, not a span of its own
            wall[0] += 1.0
    assert timing.events() == [["load", 1000.0, 1004.0], ["sample", 1014.0, 1018.0]]
    run = tmp_path / "run"
    out = run / "logs" / "phases" / "02_one_direction.json"
    out.parent.mkdir(parents=True)
    timing.save(out, wall=20.0)
    assert (out.parent / "02_one_direction.events.json").exists()
    (run / "record.json").write_text(json.dumps({"timings": {"t0_unix": 990.0}}))
    assert list(timing.run_table(run).columns) == ["02_one_direction", "all processes"]
    spans = timing.phase_spans(run)
    assert spans.to_dict(orient="records") == [
        {"chapter": "02_one_direction", "phase": "load", "start_s": 10.0, "end_s": 14.0},
        {"chapter": "02_one_direction", "phase": "sample", "start_s": 24.0, "end_s": 28.0}]
    (run / "record.json").write_text(json.dumps({"timings": {}}))  # a run before t0_unix: no spans
    assert timing.phase_spans(run).empty
