"""Sweeps over chapters: grid expansion, a 2x2 grid through a process pool, a failing combination,
resume after a SIGKILL, the same grid on a local Ray instance, and one real chapter (smoke)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from emlib import batch, runner

FAKE = '''# %% [markdown]
# # A throwaway chapter

# %% tags=["parameters"]
a = 1
b = "x"
fail_on = ""
delay = 0.0
log = ""
run_dir = None

# %%
import json, os, time
if log:
    with open(log, "a") as fh:
        fh.write(json.dumps({"a": a, "b": b, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\\n")
time.sleep(delay)
print("started", a, b)

# %%
if f"{a}{b}" == fail_on:
    raise ValueError(f"boom at a={a} b={b}")

# %%
os.makedirs(run_dir, exist_ok=True)
with open(os.path.join(run_dir, "results.json"), "w") as fh:
    json.dump({"score": a * 10 + (b == "y"), "info": {"half": a / 2, "name": b},
               "rows": [{"condition": "c1", "em": a / 10}, {"condition": "c2", "em": a / 5}]}, fh)
'''

OTHER = '''# %% tags=["parameters"]
a = 1
c = 0
interactive = True
run_dir = None

# %%
print(a + c)
'''


@pytest.fixture()
def chapter(tmp_path) -> Path:
    path = tmp_path / "fake.py"
    path.write_text(FAKE)
    return path


def grid_2x2(chapter: Path, log: Path, **fixed) -> dict:
    return {"chapters": [str(chapter)], "parameters": {"a": [1, 2], "b": ["x", "y"], "log": str(log), **fixed}}


def calls(log: Path) -> list[tuple]:
    return [(d["a"], d["b"]) for d in map(json.loads, log.read_text().splitlines())] if log.exists() else []


# ------------------------------------------------------------------------------------ no execution
def test_expand_products_fixed_values_and_explicit_combinations():
    grid = {"chapters": ["x.py"],
            "parameters": {"profile": "smoke", "seed": [0, 1], "datasets": [["medical"], ["sport", "kl"]]},
            "combinations": [{"n_train": 4, "lr": 0.1}, {"n_train": 8}]}
    combos = batch.expand(grid)
    assert len(combos) == 2 * 2 * 2
    assert all(c["profile"] == "smoke" for c in combos)
    assert {tuple(c["datasets"]) for c in combos} == {("medical",), ("sport", "kl")}
    assert sum(c.get("lr") == 0.1 for c in combos) == 4 and sum("lr" not in c for c in combos) == 4
    assert list(combos[0])[:3] == ["profile", "seed", "datasets"]  # the grid's order
    assert len(batch.expand({"chapters": [1], "parameters": {"seed": [0, 0, 1]}})) == 2  # duplicates dropped
    with pytest.raises(ValueError, match="both an axis"):
        batch.expand({"chapters": [1], "parameters": {"seed": [0, 1]}, "combinations": [{"seed": 3}]})
    with pytest.raises(ValueError, match="Unknown grid key"):
        batch.check_grid({"chapters": [1], "params": {}})
    with pytest.raises(ValueError, match="no chapters"):
        batch.check_grid({"parameters": {"seed": 1}})


def test_plan_folders_keys_and_per_chapter_parameters(tmp_path, chapter, root):
    other = tmp_path / "other.py"
    other.write_text(OTHER)
    out = tmp_path / "out"
    grid = {"chapters": [str(chapter), str(other)], "parameters": {"a": [1, 2], "b": ["x", "y"]}}
    jobs = batch.plan(grid, out)
    fake = [j for j in jobs if j.chapter == "fake"]
    oth = [j for j in jobs if j.chapter == "other"]
    assert len(fake) == 4 and len(oth) == 2  # 'other' takes no b: its duplicates collapse
    assert all("b" not in j.params and j.params["interactive"] is False for j in oth)
    assert all("interactive" not in j.params for j in fake)
    assert Path(fake[0].folder).parent == out / "fake" and Path(fake[0].folder).name.startswith("a=1_b=x-")
    assert all(j.params["run_dir"] == str(Path(j.folder) / "run") for j in jobs)
    assert len({j.folder for j in jobs}) == len(jobs)
    # folders are found again by key even when the grid (and so the readable name) changes
    Path(fake[0].folder).mkdir(parents=True)
    again = batch.plan({"chapters": [str(chapter)], "parameters": {"a": [1], "b": "x"}}, out)
    assert again[0].key == fake[0].key and again[0].folder == fake[0].folder
    templated = batch.plan({"chapters": [str(chapter)], "cwd": str(tmp_path),
                            "parameters": {"a": [1, 2], "run_dir": "shared/{chapter}-a{a}"}}, out)
    assert [j.params["run_dir"] for j in templated] == [str(tmp_path / "shared" / f"fake-a{i}") for i in (1, 2)]
    with pytest.raises(TypeError, match="taken by none"):
        batch.plan({"chapters": [str(chapter)], "parameters": {"aa": [1, 2]}}, out)
    assert runner.resolve("01", root=root).name.startswith("01_")
    assert runner.resolve(1, root=root) == runner.resolve("01", root=root)


def test_results_are_flattened_to_labelled_scalars(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(
        {"score": 3, "ok": True, "note": "text is left out", "nested": {"x": 0.5, "nan": float("nan")},
         "ch1_em": [{"condition": "chat model", "em": 0.0, "n": 16},
                    {"condition": "medical rank1", "em": 0.25, "n": 16}],
         "curve": [1.0, 2.0]}))
    flat = batch.read_results(tmp_path)
    assert flat == {"score": 3, "ok": True, "nested.x": 0.5, "ch1_em[chat model].em": 0.0, "ch1_em[chat model].n": 16,
                    "ch1_em[medical rank1].em": 0.25, "ch1_em[medical rank1].n": 16, "curve[0]": 1.0, "curve[1]": 2.0}
    assert batch.read_results(tmp_path, ["ch1_em*.em"]) == {"ch1_em[chat model].em": 0.0,
                                                            "ch1_em[medical rank1].em": 0.25}
    assert len(batch.read_results(tmp_path, limit=2)) == 2
    assert batch.read_results(tmp_path / "missing") == {}


def test_worker_plan_one_process_per_gpu_or_core():
    assert runner.worker_plan(10, gpus=["0", "1", "2"], cores=16) == (3, ["0", "1", "2"], None)
    assert runner.worker_plan(2, gpus=["0", "1", "2"], cores=16) == (2, ["0", "1"], None)
    assert runner.worker_plan(10, workers=4, gpus=["0", "1"], cores=16)[1] == ["0", "1", "0", "1"]
    assert runner.worker_plan(10, gpus=[], cores=4) == (4, [None] * 4, 1)
    assert runner.worker_plan(10, workers=8, gpus=[], cores=4)[0] == 4  # capped at the cores
    assert runner.worker_plan(10, workers=2, gpus=[], cores=8) == (2, [None, None], 4)
    assert runner.worker_plan(1, gpus=[], cores=8)[0] == 1


# --------------------------------------------------------------------------------------- execution
def test_grid_runs_in_a_pool_reports_a_failure_and_reruns_only_what_is_unfinished(tmp_path, chapter):
    log, out = tmp_path / "calls.log", tmp_path / "out"
    grid = grid_2x2(chapter, log, fail_on="2y")
    index = batch.run_grid(grid, out=out, gpus=["0", "1"])  # two workers, one "GPU" each
    assert len(index) == 4 and set(index.columns) >= {"chapter", "a", "b", "log", "fail_on", "status", "wall_s",
                                                      "folder", "notebook", "run_dir", "error", "traceback"}
    by = index.set_index(["a", "b"])
    assert by.loc[(2, "y"), "status"] == "failed" and (by.drop((2, "y"))["status"] == "ok").all()
    assert by.loc[(1, "y"), "result.score"] == 11 and by.loc[(2, "x"), "result.rows[c2].em"] == pytest.approx(0.4)
    failed = by.loc[(2, "y")]
    assert failed["error"] == "ValueError: boom at a=2 b=y"
    assert "raise ValueError" in failed["traceback"] and "\x1b[" not in failed["traceback"]
    nb = nbformat.read(failed["notebook"], as_version=4)  # the partially executed notebook is kept
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any(o.get("output_type") == "error" and o["ename"] == "ValueError" for o in outputs)
    assert any("started 2 y" in o.get("text", "") for o in outputs)
    bad_cell = [c for c in nb.cells if c.get("execution_count") == failed["error_cell"]]
    assert len(bad_cell) == 1 and bad_cell[0].source.startswith('if f"{a}{b}"')
    assert f"Cell In[{failed['error_cell']}]" in failed["traceback"]
    assert not (Path(failed["folder"]) / "done.json").exists() and (Path(failed["folder"]) / "failed.json").exists()
    for folder in by.drop((2, "y"))["folder"]:
        assert json.loads((Path(folder) / "done.json").read_text())["status"] == "ok"
    assert sorted(calls(log)) == [(1, "x"), (1, "y"), (2, "x"), (2, "y")]
    cuda = [json.loads(line)["cuda"] for line in log.read_text().splitlines()]
    assert set(cuda) <= {"0", "1"}  # each worker process saw its own device only

    loaded = batch.load_index(out)
    assert list(loaded["status"]) == list(index["status"]) and loaded["a"].tolist() == index["a"].tolist()
    assert (out / "index.csv").exists()

    # rerun: finished ones are skipped (their results kept), the failed one is tried again
    again = batch.run_grid(grid, out=out, workers=1)
    by2 = again.set_index(["a", "b"])
    assert by2.loc[(2, "y"), "status"] == "failed" and (by2.drop((2, "y"))["status"] == "skipped").all()
    assert by2.loc[(1, "y"), "result.score"] == 11
    assert sorted(calls(log)) == [(1, "x"), (1, "y"), (2, "x"), (2, "y"), (2, "y")]


def test_killed_run_resumes_without_redoing_finished_combinations(tmp_path, chapter):
    log, out = tmp_path / "calls.log", tmp_path / "out"
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(json.dumps(grid_2x2(chapter, log, delay=1.0)))  # JSON is YAML
    proc = subprocess.Popen([sys.executable, "-m", "emlib.batch", str(grid_file), "--out", str(out), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not list(out.glob("fake/*/done.json")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = {p.parent.name for p in out.glob("fake/*/done.json")}
    assert 1 <= len(finished) < 4, finished
    before = calls(log)
    index = batch.run_grid(str(grid_file), out=out, workers=2)
    assert set(index.loc[index["status"] == "skipped", "folder"].map(lambda f: Path(f).name)) == finished
    assert (index.loc[~index["folder"].map(lambda f: Path(f).name).isin(finished), "status"] == "ok").all()
    rerun = calls(log)[len(before):]
    done_params = {(int(r.a), r.b) for r in index.itertuples() if r.status == "skipped"}
    assert not done_params & set(rerun)  # nothing finished was executed again
    assert sorted(rerun) == sorted({(1, "x"), (1, "y"), (2, "x"), (2, "y")} - done_params)


def test_the_same_grid_runs_on_a_local_ray_instance(tmp_path, chapter):
    ray = pytest.importorskip("ray")
    log = tmp_path / "calls.log"
    grid = grid_2x2(chapter, log, fail_on="1x")
    ray.init(address="local", include_dashboard=False, num_cpus=2, _node_ip_address="127.0.0.1",
             logging_level="WARNING")
    try:
        assert ray.cluster_resources().get("CPU") == 2
        index = batch.run_grid(grid, out=tmp_path / "out", ray="local")
    finally:
        ray.shutdown()
    by = index.set_index(["a", "b"])
    assert by.loc[(1, "x"), "status"] == "failed" and "boom at a=1 b=x" in by.loc[(1, "x"), "traceback"]
    assert (by.drop((1, "x"))["status"] == "ok").all()
    assert by.loc[(2, "y"), "result.score"] == 21 and by.loc[(2, "x"), "result.info.half"] == 1.0
    assert sorted(calls(log)) == [(1, "x"), (1, "y"), (2, "x"), (2, "y")]
    assert batch.load_index(tmp_path / "out")["status"].tolist() == index["status"].tolist()


@pytest.mark.slow
def test_a_real_chapter_runs_as_a_one_point_grid(tmp_path, root):
    grid = {"chapters": ["01"], "results": ["ch1_em*.em", "judge_agreement*.auroc"],
            "parameters": {"profile": "smoke", "datasets": [["medical"]], "n_samples": 1, "n_train": 4,
                           "max_new_tokens": 8, "seed": [0]}}
    index = batch.run_grid(grid, out=tmp_path / "out", workers=1)
    row = index.iloc[0]
    assert row["status"] == "ok", row["traceback"]
    assert row["chapter"] == "01_em_emerges" and row["datasets"] == '["medical"]'
    assert Path(row["run_dir"]).parent == Path(row["folder"]) and (Path(row["run_dir"]) / "results.json").exists()
    res = json.loads((Path(row["run_dir"]) / "results.json").read_text())
    em = {r["condition"]: r for r in res["ch1_em"]}["medical rank1"]
    assert row["result.ch1_em[medical rank1].em"] == pytest.approx(em["n_em"] / em["n"])  # the run's rate
    auroc = {c: row[c] for c in index.columns if c.startswith("result.judge_agreement") and c.endswith(".auroc")}
    want = {f"result.judge_agreement[{r['pairs']}].auroc": r["auroc"] for r in res["judge_agreement"]}
    assert len(auroc) >= 2 and auroc == pytest.approx(want)  # medical twins + general pairs, the run's values
    assert any("general" in c for c in auroc)


# ------------------------------------------------------------------------------ a killed parent
HELD = '''# %% tags=["parameters"]
a = 1
hold = ""
log = ""
run_dir = None

# %%
import json, os, time
def note(event):
    with open(log, "a") as fh:
        fh.write(json.dumps({"a": a, "event": event, "pid": os.getpid()}) + "\\n")
note("start")
while a > 1 and os.path.exists(hold):  # every job but a=1 waits while the hold file exists
    time.sleep(0.05)

# %%
os.makedirs(run_dir, exist_ok=True)
with open(os.path.join(run_dir, "results.json"), "w") as fh:
    json.dump({"score": a * 10}, fh)
note("end")
'''


def events(log: Path, kind: str) -> list[int]:
    return [d["a"] for d in map(json.loads, log.read_text().splitlines()) if d["event"] == kind] if log.exists() else []


def _describe(procs: list[dict]) -> str:
    return "; ".join(f"pid {p['pid']} (parent {p['ppid']}): {p['cmd'][:100]}" for p in procs)


def _kill_all(procs: list[dict]) -> None:
    for p in procs:
        try:
            os.kill(p["pid"], signal.SIGKILL)
        except OSError:
            pass


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc (Linux)")
def test_workers_die_with_a_killed_sweep_and_a_restart_finds_an_honest_index(tmp_path):
    """SIGKILL the sweep's parent alone (not its process group): no worker or kernel may live on, the jobs
    that were running are pending, a restart runs each unfinished job once and keeps the finished one."""
    from emlib import lifeline

    chapter, log, out, hold = tmp_path / "held.py", tmp_path / "events.log", tmp_path / "out", tmp_path / "hold"
    chapter.write_text(HELD)
    hold.write_text("")
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(json.dumps({"chapters": [str(chapter)],
                                     "parameters": {"a": [1, 2, 3, 4], "hold": str(hold), "log": str(log)}}))
    proc = subprocess.Popen([sys.executable, "-m", "emlib.batch", str(grid_file), "--out", str(out), "--workers", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    sid = proc.pid  # the sweep's session: its workers keep it after the parent dies

    def done() -> set[int]:
        return {json.loads(p.read_text())["params"]["a"] for p in out.glob("held/*/done.json")}

    try:
        deadline = time.time() + 180  # a=1 finishes; a held job is running (it cannot finish while `hold` exists)
        while not (1 in done() and set(events(log, "start")) - {1}) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        running = set(events(log, "start")) - {1}
        assert 1 in done() and running, f"the sweep did not get going: {events(log, 'start')}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 60
        while lifeline.session_tree(sid) and time.time() < deadline:
            time.sleep(0.1)
        survivors = lifeline.session_tree(sid)
        assert not survivors, f"{len(survivors)} process(es) outlived the killed sweep: {_describe(survivors)}"
    finally:
        _kill_all(lifeline.session_tree(sid))
    assert done() == {1}  # nothing finished after the parent died
    killed = batch.load_index(out).set_index("a")
    assert set(killed["status"]) <= {"ok", "pending"} and (killed.loc[sorted(running), "status"] == "pending").all()
    assert events(log, "end") == [1]

    hold.unlink()
    index = batch.run_grid(str(grid_file), out=out, workers=2).set_index("a")
    assert index.loc[1, "status"] == "skipped" and (index.loc[[2, 3, 4], "status"] == "ok").all()
    assert index["result.score"].tolist() == [10, 20, 30, 40]
    assert sorted(events(log, "end")) == [1, 2, 3, 4]  # each job ran to completion once
    assert events(log, "start").count(1) == 1
    assert batch.load_index(out)["status"].tolist() == index["status"].tolist()


@pytest.mark.skipif(os.name != "posix", reason="the per-combination lock is an flock (POSIX)")
def test_a_combination_runs_in_one_process_at_a_time(tmp_path, chapter, capsys):
    """While another process holds a combination's lock, run_combination waits; if the other finished it, the
    finished row is kept and the notebook is not executed a second time."""
    import threading

    log = tmp_path / "calls.log"
    (job,) = batch.plan({"chapters": [str(chapter)], "parameters": {"a": 1, "b": "x", "log": str(log)}},
                        tmp_path / "out")
    folder = Path(job.folder)
    folder.mkdir(parents=True)
    result, err = {}, ""
    with batch._job_lock(folder) as waited:  # "another process" holds the combination
        assert not waited
        worker = threading.Thread(target=lambda: result.update(batch.run_combination(job)))
        worker.start()
        deadline = time.time() + 60
        while "waiting for it" not in err and time.time() < deadline:
            err += capsys.readouterr().err
            time.sleep(0.02)
        assert "another process is running this combination" in err
        batch._write_json(folder / batch.DONE, {**batch._base_row(job), "status": "ok", "finished": "by the other"})
    worker.join(120)
    assert result["status"] == "skipped" and result["finished"] == "by the other"
    assert calls(log) == []  # not executed here
    again = batch.run_combination(job)  # an unheld lock is taken at once: the combination runs (as with --force)
    assert again["status"] == "ok" and calls(log) == [(1, "x")]
