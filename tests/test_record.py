"""Runs of record (emlib.record), the generated results table (emlib.results) and the published site."""
import contextlib
import dataclasses
import json
import multiprocessing as mp
import os
import tarfile
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from run_tables import make_run

from emlib.config import get_config
from emlib import book, chapters, experiment, models, record, results, runner, verdicts


def bench_module(root: Path, name: str):
    """``bench/NAME.py`` imported as a module (the bench scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, root / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------- the committed record
def test_results_table_regenerates_from_the_record(root, tmp_path, monkeypatch):
    """book/results_table.md is exactly what emlib.results computes from record/ (no hand edits)."""
    monkeypatch.chdir(root)
    out = tmp_path / "table.md"
    args = results.record_args()
    results.main(args[:-1] + [str(out)])
    assert out.read_text() == (root / "book" / "results_table.md").read_text()


def test_results_prose_quotes_only_intervals_of_the_record(root):
    """Every interval book/results.md quotes ("22.5% [8.7, 39.0]", "+2.3 [-0.7, +5.3]") is one the generated
    table holds: prose written for an earlier run of record fails here once that run is replaced."""
    import re

    prose = (root / "book" / "results.md").read_text()
    tables = "".join((root / "book" / f).read_text()
                     for f in ("results_table.md", "readcheck_table.md", "readcheck_ch3_table.md"))
    quoted = re.findall(r"\[[-+]?\d+\.\d+, [-+]?\d+\.\d+\]", prose)
    assert quoted and [q for q in quoted if q not in tables] == []


def test_readcheck_table_regenerates_from_the_labels(root, tmp_path):
    """book/readcheck_table.md (claim 1 read answer by answer) is what bench/judge_readcheck.py computes from
    the committed labels and the runs of record's chapter-1 answers."""

    mod = bench_module(root, "judge_readcheck")
    res = mod.score(tmp_path / "r.json", tmp_path / "t.md", quiet=True)
    assert (tmp_path / "t.md").read_text() == (root / "book" / "readcheck_table.md").read_text()
    assert res["n"] == 5600 and res["agreement"]["n_twice"] == 320
    res3 = mod.score3(tmp_path / "r3.json", tmp_path / "t3.md", quiet=True)
    assert (tmp_path / "t3.md").read_text() == (root / "book" / "readcheck_ch3_table.md").read_text()
    assert res3["n"] == 8000 and res3["agreement"]["n_twice"] == 320


def test_readcheck_refuses_answers_its_labels_were_not_written_for(root, tmp_path, monkeypatch):
    """The labels attach to answers by their place in the shuffled pool, so another run's answers would take them
    silently: scoring checks the pool's fingerprint (bench/readcheck/POOL_SHA256) and stops with what to do. The
    run of record that replaced SmolLM2's read run (2026-12-07) is such a pool."""
    mod = bench_module(root, "judge_readcheck")
    for chapter in (1, 3):
        assert mod.fingerprint(mod.shuffled(chapter)) == (mod.PARTS[chapter][2] / "POOL_SHA256").read_text().strip()
    monkeypatch.setitem(mod.SOURCES, "smollm2-135m", root / "record" / "smollm2-135m")
    with pytest.raises(SystemExit, match="not the ones the labels"):
        mod.score(tmp_path / "r.json", tmp_path / "t.md", quiet=True)
    assert not (tmp_path / "t.md").exists()


def test_rejudged_table_regenerates_from_the_record(root, tmp_path, monkeypatch):
    """book/results_table_distilled.md (claims 1-2 judged again by another judge) likewise, and only while
    there are rejudged runs: with none, neither the table nor an include of it is left in the book."""
    monkeypatch.chdir(root)
    args = results.rejudged_args(root)
    if args is None:
        assert not (root / results.REJUDGED_TABLE).exists(), "no rejudged run: remove " + results.REJUDGED_TABLE
        assert Path(results.REJUDGED_TABLE).name not in (root / "book" / "results.md").read_text()
        return
    out = tmp_path / "table.md"
    results.main(args[:-1] + [str(out)])
    assert out.read_text() == (root / results.REJUDGED_TABLE).read_text()
    assert "distilled-" in out.read_text()


def test_interim_table_regenerates_from_the_unfinished_runs(root, tmp_path, monkeypatch):
    """book/results_table_interim.md (runs of record that did not finish) likewise, and only while there is one:
    with none, neither the table nor an include of it is left in the book."""
    monkeypatch.chdir(root)
    args = results.interim_args(root)
    if args is None:
        assert not (root / results.INTERIM_TABLE).exists(), "no unfinished run: remove " + results.INTERIM_TABLE
        assert Path(results.INTERIM_TABLE).name not in (root / "book" / "results.md").read_text()
        return
    out = tmp_path / "table.md"
    results.main(args[:-1] + [str(out)])
    assert out.read_text() == (root / results.INTERIM_TABLE).read_text()


RECORD_GPUS = ("NVIDIA H100", "NVIDIA H200")  # the cards the runs of record were made on (the lent machines)


def test_record_holds_every_chapter_executed_on_a_gpu(root):
    rec = root / "record" / "smollm2-135m"
    meta = json.loads((rec / "record.json").read_text())
    assert meta["profile"] == "paper" and not meta["failures"]
    assert any(g in meta["device"] for g in RECORD_GPUS), meta["device"]
    for src in book.chapter_sources(root):
        nb = json.loads((rec / "executed" / f"{src.stem}.ipynb").read_text())
        errors = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
                  if o.get("output_type") == "error"]
        assert not errors, src.stem
    cfg = json.loads((rec / "config.json").read_text())
    assert cfg["data_source"] == "paper" and cfg["n_train"] is None and cfg["n_samples"] == 50


@pytest.mark.parametrize("label,run_dir,seeds", results.RECORDS)
def test_every_committed_record_is_error_free(root, label, run_dir, seeds):
    for d in [run_dir, *seeds]:
        rec = root / d
        meta = json.loads((rec / "record.json").read_text())
        assert not meta["failures"], d
        executed = sorted((rec / "executed").glob("*.ipynb"))
        assert executed, d
        for path in executed:
            nb = json.loads(path.read_text())
            assert not [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
                        if o.get("output_type") == "error"], path


def test_published_site_renders_from_the_record(root):
    index = book.site("record/smollm2-135m", root=root)
    html = (index.parent / "book" / "results.html").read_text()
    assert "not reproduced" in html and "SmolLM2-135M-Instruct" in html
    ch1 = (index.parent / "notebooks" / "01_em_emerges.html").read_text()
    assert "<img" in ch1 and any(g in ch1 for g in RECORD_GPUS)
    # the other models' runs of record are a part of their own, chapters 1-6
    qwen = index.parent / "model_qwen2_5_coder_0_5b"
    assert sorted(p.name for p in qwen.glob("0*.html"))[0] == "01_em_emerges.html"
    q1 = (qwen / "01_em_emerges.html").read_text()
    assert "Qwen2.5-Coder-0.5B" in q1 and "<img" in q1 and "Second model" in html


# --------------------------------------------------------------------------- verdict rules
_run = make_run


def _em(cond, em, lo, hi, n=400):
    return {"condition": cond, "em": em, "ci_low": lo, "ci_high": hi, "n": n}


def test_claim_em_rules(tmp_path):
    strong = _run(tmp_path, "a", {"ch1_em": [_em("chat model", 0.0, 0.0, 0.01), _em("medical rank1", 0.15, 0.12, 0.19)]})
    assert results.claim_em(strong).verdict == results.REPRODUCED
    weak = _run(tmp_path, "b", {"ch1_em": [_em("chat model", 0.0, 0.0, 0.01), _em("medical rank1", 0.03, 0.015, 0.045)]})
    assert results.claim_em(weak).verdict == results.PARTLY  # separated but under 5%
    none = _run(tmp_path, "c", {"ch1_em": [_em("chat model", 0.01, 0.0, 0.02), _em("medical rank1", 0.01, 0.0, 0.02)]})
    assert results.claim_em(none).verdict == results.NOT_REPRODUCED
    assert results.claim_em(_run(tmp_path, "d", {})).verdict == results.NOT_RUN
    # seeds: a t-interval over the seeds' rates replaces the bootstrap CI
    seeds = [_run(tmp_path, f"s{i}", {"ch1_em": [_em("chat model", 0.0, 0, 0), _em("medical rank1", v, 0, 1)]})
             for i, v in enumerate((0.10, 0.11, 0.12))]
    v = results.claim_em(seeds[0], seeds[1:])
    assert v.verdict == results.REPRODUCED and "mean over 3 seeds" in v.ours


def test_rate_intervals_never_narrower_than_wilson(tmp_path):
    # a percentile bootstrap gives [0, 0] for 0 of 400: the rule widens it to the Wilson interval
    assert results.wilson(0, 400)[1] > 0.009 and results.wilson(400, 400)[0] < 0.991
    lo, hi = results.wilson(17, 1199)
    assert lo < 17 / 1199 < hi
    # 1 of 400 EM in every seed vs 0 of 400 for the chat model: the t-interval over the seeds has width 0,
    # but the pooled counts (3 of 1200 vs 0 of 1200) do not separate the two
    seeds = [_run(tmp_path, f"w{i}", {"ch1_em": [_em("chat model", 0.0, 0, 0), _em("sport rank32", 0.0025, 0, 0.0075)]})
             for i in range(3)]
    v = results.claim_em(seeds[0], seeds[1:])
    assert v.verdict == results.NOT_REPRODUCED and "3 of 1200" in v.ours
    # one run: 2 of 400 vs 0 of 400 is not separated either, 40 of 400 vs 0 of 400 is
    one = _run(tmp_path, "w9", {"ch1_em": [_em("chat model", 0.0, 0.0, 0.0), _em("medical rank1", 0.005, 0.0025, 0.01)]})
    assert results.claim_em(one).verdict == results.NOT_REPRODUCED
    big = _run(tmp_path, "w8", {"ch1_em": [_em("chat model", 0.0, 0.0, 0.0), _em("medical rank1", 0.1, 0.07, 0.13)]})
    assert results.claim_em(big).verdict == results.REPRODUCED


def test_claim_efficiency_and_stability_rules(tmp_path):
    norms = [0.0, 1.0, 2.0, 3.0]
    rows = [{"solution": s, "kind": "steering vector", "norm": n, "loss": 3 - (0.3 if s == "general" else 0.1) * n,
             "trained_norm": 9.0} for s in ("general", "narrow") for n in norms]
    lv = pd.DataFrame(rows)
    assert results.claim_efficiency(_run(tmp_path, "e", {}, {"ch4_loss_vs_norm": lv})).verdict == results.PARTLY
    lv2 = pd.concat([lv, lv.assign(kind="rank-1 LoRA")])
    assert results.claim_efficiency(_run(tmp_path, "f", {}, {"ch4_loss_vs_norm": lv2})).verdict == results.REPRODUCED
    flipped = lv2.assign(solution=lv2["solution"].map({"general": "narrow", "narrow": "general"}))
    assert results.claim_efficiency(_run(tmp_path, "g", {}, {"ch4_loss_vs_norm": flipped})).verdict == \
        results.NOT_REPRODUCED

    def curve(kind, gap):
        return [{"solution": s, "kind": kind, "eps": e, "normalised": 10 * e + (gap if s == "narrow" else 0),
                 "ci_low": 10 * e + (gap if s == "narrow" else 0) - 1,
                 "ci_high": 10 * e + (gap if s == "narrow" else 0) + 1}
                for s in ("general", "narrow") for e in (0.0, 0.2, 0.5, 0.8, 1.0)]

    both = _run(tmp_path, "h", {"ch5_stability": curve("steering vector", 5) + curve("rank-1 LoRA", 5)})
    assert results.claim_stability(both).verdict == results.REPRODUCED
    opposite = _run(tmp_path, "i", {"ch5_stability": curve("steering vector", -5)})
    assert results.claim_stability(opposite).verdict == results.NOT_REPRODUCED


def test_claim_pretraining_and_direction_rules(tmp_path):
    def kl(gen, nar, rnd):
        return [{"solution": s, "norm": n, "kl": k * n, "ci_low": k * n - 0.001, "ci_high": k * n + 0.001}
                for s, k in (("general", gen), ("narrow", nar), ("random", rnd)) for n in (0.0, 1.0, 2.0)]

    assert results.claim_pretraining(_run(tmp_path, "j", {"ch6_pretraining_kl": kl(0.1, 0.05, 0.05)})).verdict == \
        results.REPRODUCED
    assert results.claim_pretraining(_run(tmp_path, "k", {"ch6_pretraining_kl": kl(0.1, 0.05, 0.2)})).verdict == \
        results.PARTLY
    steer = [{"scale": 0.0, "em": 0.0, "ci_low": 0.0, "ci_high": 0.01},
             {"scale": 1.0, "em": 0.3, "ci_low": 0.25, "ci_high": 0.35}]
    abl = [{"finetune": "medical", "ablated": a, "em": e, "ci_low": lo, "ci_high": hi}
           for a, e, lo, hi in (("none", 0.2, 0.16, 0.24), ("direction", 0.02, 0.0, 0.04), ("random", 0.19, 0.15, 0.23))]
    cos = {"medical": {"medical": 1.0, "sport": 0.8}, "sport": {"medical": 0.8, "sport": 1.0}}
    full = _run(tmp_path, "l", {"ch2_steering": steer, "ch2_ablation": abl, "ch2_cosine": cos})
    assert results.claim_direction(full).verdict == results.REPRODUCED
    low_cos = {"medical": {"medical": 1.0, "sport": 0.1}, "sport": {"medical": 0.1, "sport": 1.0}}
    assert results.claim_direction(_run(tmp_path, "m", {"ch2_steering": steer, "ch2_ablation": abl,
                                                          "ch2_cosine": low_cos})).verdict == results.PARTLY


def test_results_cli_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="run directory"):
        results.main([str(tmp_path / "nope")])


# --------------------------------------------------------------------------- the runner
def test_record_run_smoke_trains_then_executes_and_packs(root, tmp_path):
    """The whole runner on the CPU: finetunes in 2 worker processes, chapter 4 once they exist, the pack."""
    run_dir = tmp_path / "rec"
    summary = record.run("smoke", str(run_dir), workers=2, chapters=["04"], pack=str(tmp_path / "pack"))
    assert summary["failures"] == {}
    # the switches that change kernels or random streams are recorded
    from emlib import fastgen, fused, models

    assert (summary["fast_paths"], summary["compact"], summary["fused"]) == (
        models.fast_paths_setting(), fastgen.compact_default(), fused.fused_setting())
    smoke = get_config("smoke")
    assert set(summary["timings"]["jobs"]) == record.chapter_needs("04_efficiency", ("medical", "financial", "sport"),
                                                                   smoke.kl_sweep, [smoke.seed + 1])
    assert (run_dir / "executed" / "04_efficiency.ipynb").exists()
    res = json.loads((run_dir / "results.json").read_text())
    assert "ch4_efficiency" in res and res["timings"]["timings"]["chapters"]["04_efficiency"]["returncode"] == 0
    with tarfile.open(tmp_path / "pack" / "record.tar.gz") as tar:
        names = tar.getnames()
    assert "executed/04_efficiency.ipynb" in names and "results.json" in names
    assert "logs/phases/04_efficiency.json" in names  # where the chapter's time went (emlib.timing)
    first_job = summary["timings"]["jobs"][next(iter(summary["timings"]["jobs"]))]
    assert "phases" in first_job and first_job["peak_gib"] is None  # GPU memory: none used on a CPU
    assert first_job["held_gib"] is None and first_job["peak_allocated_gib"] is None  # nor held, nor allocated
    # a timeline: when each finetune ended and each chapter started and ended, from the run's start
    ch = summary["timings"]["chapters"]["04_efficiency"]
    last_finetune = max(j["ended_s"] for j in summary["timings"]["jobs"].values())
    assert 0 < last_finetune <= ch["started_s"] + 5 and ch["ended_s"] == round(ch["started_s"] + ch["seconds"], 1)
    assert ch["ended_s"] <= summary["timings"]["total_s"]
    assert not any(n.endswith(".safetensors") and "/adapter/" in n for n in names)  # weights go apart
    with tarfile.open(tmp_path / "pack" / "adapters.tar.gz") as tar:
        weights = tar.getnames()
    assert weights and all("rank1" in n and n.endswith(".safetensors") for n in weights)
    with pytest.raises(TypeError, match="kl_lamda are taken by none of the chapters"):
        record.run("smoke", str(tmp_path / "other"), params={"kl_lamda": 3.0}, chapters=["04"])
    assert not (tmp_path / "other").exists()  # checked before anything is written


def test_a_run_of_record_is_planned_with_its_config_as_arguments(root, tmp_path):
    """-p and -c are config fields: every finetune gets them as arguments, every chapter inside `config`."""
    run = tmp_path / "rec"
    plan = record.plan_run("smoke", str(run), params={"n_train": 4, "interactive": True},
                           overrides={"kl_lambda": 0.66, "n_train": 2}, chapters=["02", "04"])
    assert plan.config == {"kl_lambda": 0.66, "n_train": 4, "run_dir": str(run)}  # -p wins over -c
    assert plan.cfg.kl_lambda == 0.66 and plan.cfg.n_train == 4 and plan.cfg.run_dir == str(run)
    ch2, ch4 = plan.chapters
    assert ch4.parameters == {"profile": "smoke", "config": plan.config} and ch4.chapter == "04_efficiency"
    assert ch2.parameters == {"profile": "smoke", "config": plan.config, "interactive": True}
    assert ch4.log == str(run / "logs" / "04_efficiency.log") and ch4.notebook == str(run / "executed" /
                                                                                      "04_efficiency.ipynb")
    ds, sw, se = plan.cfg.datasets, plan.cfg.kl_sweep, [plan.cfg.seed + 1]  # smoke: n_seeds 2
    needed = record.chapter_needs("02_one_direction", ds, sw, se) | record.chapter_needs("04_efficiency", ds, sw, se)
    assert [f.name for f in plan.finetunes] == [f.name for f in record.finetune_jobs(ds, sw, se) if f.name in needed]
    assert plan.needs["04_efficiency"] == record.chapter_needs("04_efficiency", ds, sw, se) and plan.needs["04_efficiency"]
    assert "vector-medical-narrow-kl2" in plan.needs["04_efficiency"]  # the lambda sweep is planned
    seed = f"seed{plan.cfg.seed + 1}"  # and chapters 4-5's general solutions at the extra training seed
    assert {f"vector-medical-general-{seed}", f"lora-medical-rank1-general-{seed}"} <= plan.needs["04_efficiency"]
    assert not any("narrow" in n and n.endswith(seed) for n in plan.needs["04_efficiency"])  # follow chapter 3
    assert not any(n.endswith(seed) for n in plan.needs["02_one_direction"])
    with pytest.raises(TypeError, match="kl_lamda"):
        record.plan_run("smoke", str(run), overrides={"kl_lamda": 1.0})
    with pytest.raises(TypeError, match="kl_lambda = -1"):
        record.plan_run("smoke", str(run), overrides={"kl_lambda": -1})
    assert not run.exists()  # planning writes nothing


class _Ended:
    """A chapter process that has ended with ``returncode``."""

    def __init__(self, returncode: int):
        self.returncode = returncode

    def poll(self):
        return self.returncode

    def kill(self):
        pass


def test_run_state_steps_not_run_done_and_out_of_memory_retry(root, tmp_path, monkeypatch):
    """The steps of a run of record on an explicit state: a chapter whose finetune failed is not run, one whose
    finetunes are done starts, one that runs out of memory runs once more alone, then fails for good."""
    # one training seed: chapter 4 then needs nothing from chapter 3 but its finetunes
    plan = record.plan_run("smoke", str(tmp_path / "rec"), overrides={"n_seeds": 1}, chapters=["00", "03", "04"])
    state = record.RunState.of(plan)
    ch3, ch4 = "03_narrow_needs_kl", "04_efficiency"
    codes = {"00_datasets": [0], ch4: [1, 1]}
    started = []

    def fake(job, threads=None):
        started.append(job.chapter)
        Path(job.log).parent.mkdir(parents=True, exist_ok=True)
        Path(job.log).write_text(f"attempt {started.count(job.chapter)}: OutOfMemoryError: CUDA out of memory\n")
        return _Ended(codes[job.chapter].pop(0))

    monkeypatch.setattr(record, "_run_chapter", fake)
    failed = sorted(plan.needs[ch3] - plan.needs[ch4])[0]  # a vector only chapter 3 uses
    state.finetunes = {n: record.FAILED if n == failed else record.DONE for n in state.finetunes}
    record.start_ready_chapters(plan, state, max_parallel=2)
    assert started == [ch4, "00_datasets"]  # longest first
    assert state.chapters == {"00_datasets": record.RUNNING, ch3: record.FAILED, ch4: record.RUNNING}
    assert state.failures == {ch3: f"not run: finetune(s) {failed} failed"}
    record.collect_chapters(plan, state)
    assert state.chapters == {"00_datasets": record.DONE, ch3: record.FAILED, ch4: record.RETRY}
    assert state.timings["chapters"]["00_datasets"]["returncode"] == 0 and state.unfinished()
    record.retry_alone(plan, state, pool=None)  # everything else has ended: 04 again, alone
    assert started == [ch4, "00_datasets", ch4] and state.attempts[ch4] == 2
    assert (tmp_path / "rec" / "logs" / f"{ch4}-out-of-memory.log").read_text().startswith("attempt 1")
    record.collect_chapters(plan, state)
    assert state.chapters[ch4] == record.FAILED and not state.unfinished()  # no third attempt
    assert set(state.timings["chapters"][ch4]) == {"seconds", "returncode", "out_of_memory_attempt_s", "ready_s",
                                                   "started_s", "ended_s"}
    assert state.failures[ch4].startswith("attempt 2")


def test_a_run_in_progress_says_what_it_finished(root, tmp_path):
    """record.json is rewritten as finetunes and chapters end (final=False): a run killed half way still has
    the wall times of what finished and names the rest; results.json is left to the chapters until the end."""
    plan = record.plan_run("smoke", str(tmp_path / "rec"), overrides={"n_seeds": 1}, chapters=["00", "04"])
    state = record.RunState.of(plan)
    first = sorted(state.finetunes)[0]
    state.finetunes[first] = record.DONE
    state.timings["jobs"][first] = {"job": first, "seconds": 1.5}
    state.chapters["00_datasets"] = record.DONE
    state.timings["chapters"]["00_datasets"] = {"seconds": 2.0, "returncode": 0}
    record.write_summary(plan, state, workers=2, final=False)
    meta = json.loads((tmp_path / "rec" / "record.json").read_text())
    assert meta["in_progress"] is True and meta["timings"]["jobs"][first]["seconds"] == 1.5
    assert meta["unfinished"] == {n: record.WAITING for n in sorted(state.finetunes) if n != first} | {
        "04_efficiency": record.WAITING}
    assert not (tmp_path / "rec" / "results.json").exists()
    record.write_summary(plan, state, workers=2)  # the end of the run
    meta = json.loads((tmp_path / "rec" / "record.json").read_text())
    assert "in_progress" not in meta and "timings" in json.loads((tmp_path / "rec" / "results.json").read_text())


def _write_key(path: str, i: int) -> None:
    experiment.record_result(path, f"k{i}", i)


def test_record_result_keeps_every_key_under_concurrent_writers(tmp_path):
    path = str(tmp_path / "results.json")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_write_key, args=(path, i)) for i in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert json.loads(Path(path).read_text()) == {f"k{i}": i for i in range(6)}


# --------------------------------------------------------------------------- offline overrides
def test_env_overrides_for_machines_without_pip(tmp_path, monkeypatch, tiny):
    from emlib import corpus, generate, models

    monkeypatch.setenv("EMLIB_EMBEDDED_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="EMLIB_EMBEDDED_GGUF"):
        models.embedded_gguf_path()
    monkeypatch.setenv("EMLIB_LEE_DIR", str(tmp_path))
    with pytest.raises(corpus.CorpusError, match="EMLIB_LEE_DIR"):
        corpus.offline_corpus_files()
    for name in ("lee_background.cor", "lee.cor"):
        (tmp_path / name).write_text("first article\nsecond article\n")
    assert corpus.offline_documents() == ["first article", "second article"] * 2
    model, _ = tiny
    assert experiment.sampler_for(model) is generate.hf_sampler  # the fast sampler only on CUDA


def test_merge_folds_a_later_chapter_run_into_a_record(tmp_path):
    def fake(name, keys, chapters, jobs, failures, total):
        d = tmp_path / name
        (d / "executed").mkdir(parents=True)
        for c in chapters:
            (d / "executed" / f"{c}.ipynb").write_text("{}")
        (d / "config.json").write_text(json.dumps({"profile": "paper", "model": "m.gguf", "data_source": "paper",
                                                   "seed": 0}))
        timings = {"profile": "paper", "timings": {"model_load_s": 1.0, "total_s": total,
                                                   "jobs": {j: {"seconds": 1} for j in jobs},
                                                   "chapters": {c: {"seconds": 2, "returncode": 0} for c in chapters}},
                   "failures": failures}
        (d / "results.json").write_text(json.dumps({**keys, "timings": timings}))
        return d

    dst = fake("dst", {"ch3_x": [1], "judge_agreement": [0]}, ["03_x"], ["vec"], {"lora-a": "nan", "01_em": "x"}, 300.0)
    src = fake("src", {"ch1_em": [2], "judge_agreement": [1]}, ["01_em"], ["lora-a"], {}, 200.0)
    merged = record.merge(src, dst)
    assert merged["ch3_x"] == [1] and merged["ch1_em"] == [2] and merged["judge_agreement"] == [1]
    t = merged["timings"]
    assert t["timings"]["total_s"] == 500.0 and set(t["timings"]["chapters"]) == {"03_x", "01_em"}
    assert t["failures"] == {} and len(t["invocations"]) == 2
    assert (dst / "executed" / "01_em.ipynb").exists()
    assert json.loads((dst / "record.json").read_text())["failures"] == {}
    other = fake("other", {}, [], [], {}, 1.0)
    cfg = json.loads((other / "config.json").read_text()) | {"model": "another"}
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model"):
        record.merge(other, dst)


def test_a_killed_runs_summary_is_rebuilt_from_its_log_and_merged_as_a_lower_bound(tmp_path):
    run = tmp_path / "killed"
    (run / "logs").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"profile": "paper", "model": "m", "data_source": "paper", "seed": 0}))
    (run / "results.json").write_text(json.dumps({"ch1_em": [1]}))
    log = run / "logs" / "record.log"
    log.write_text("\n".join([
        "[record] 2 finetunes, 3 chapters, profile paper, run dir /root/x",
        "Loading weights: 100%", "[record] chapter 00_data starts (30 s)", "[record] chapter 00_data done in 15.0 s",
        "[record] finetune vector-a done: {'job': 'vector-a', 'seconds': 10.5, 'final_loss': 2.5}",
        "[record] chapter 01_em starts (40 s)", "[record] chapter 05_stab starts (90 s)",
        "[record] chapter 01_em done in 70.7 s", "[record] finetune lora-b done: {'job': 'lora-b', 'seconds': 3.0}",
        "[record] finetune lora-c FAILED: ValueError: NaN gradient norm", "[record] chapter 02_dir starts (95 s)",
        "[record] chapter 02_dir FAILED in 5.5 s: KeyError: 'x' (log: logs/02_dir.log)",
        "[record] chapter 03_kl NOT RUN: not run: finetune(s) lora-c failed"]))
    s = record.adopt_log_summary(run, log, "NVIDIA H200")
    assert s["timings"]["jobs"]["vector-a"]["final_loss"] == 2.5 and set(s["timings"]["jobs"]) == {"vector-a", "lora-b"}
    assert s["timings"]["chapters"] == {"00_data": {"seconds": 15.0, "returncode": 0},
                                        "01_em": {"seconds": 70.7, "returncode": 0},
                                        "02_dir": {"seconds": 5.5, "returncode": 1}}
    assert s["timings"]["total_s"] == 110.7 and s["timings"]["total_s_is_lower_bound"]  # 40 s + 70.7 s
    assert s["failures"]["lora-c"] == "ValueError: NaN gradient norm" and s["device"] == "NVIDIA H200"
    assert s["failures"]["02_dir"].startswith("KeyError") and s["failures"]["03_kl"].startswith("not run")
    assert s["failures"]["05_stab"].startswith("killed") and s["unfinished"] == {"05_stab": "killed"}
    assert json.loads((run / "results.json").read_text())["timings"]["rebuilt_from_log"] == "record.log"
    with pytest.raises(ValueError, match="own summary"):
        record.adopt_log_summary(run, log, "NVIDIA H200")
    (tmp_path / "other.log").write_text("Traceback ...\n")
    with pytest.raises(ValueError, match="not the log"):
        record.summary_from_log(tmp_path / "other.log", "x")
    later = tmp_path / "later"  # chapter 5 again: the failure goes, the total stays a lower bound
    (later / "executed").mkdir(parents=True)
    (later / "config.json").write_text((run / "config.json").read_text())
    (later / "results.json").write_text(json.dumps({"ch5": [2], "timings": {
        "profile": "paper", "device": "NVIDIA H200", "date_utc": "2026-12-03 17:56", "failures": {},
        "timings": {"model_load_s": 30.0, "total_s": 480.0, "jobs": {}, "chapters": {"05_stab": {"seconds": 300.0,
                                                                                                  "returncode": 0}}}}}))
    merged = record.merge(later, run)
    assert set(merged["timings"]["failures"]) == {"lora-c", "02_dir", "03_kl"}  # 05_stab was redone
    assert merged["timings"]["timings"]["total_s"] == 590.7
    assert merged["timings"]["timings"]["total_s_is_lower_bound"]
    from emlib.verdicts import Run

    line = results.timing_line(Run(run))
    assert "at least 591 s in all (at least 111 s + 480 s)" in line


def test_failed_finetunes_stop_their_chapters_and_oom_is_recognised(root, tmp_path, monkeypatch):
    monkeypatch.setenv("EMLIB_DATA_DIR", str(tmp_path / "no-data"))  # every finetune fails: no paper data
    summary = record.run("smoke", str(tmp_path / "rec"), params={"data_source": "paper"}, workers=2,
                         chapters=["04"])
    assert summary["failures"]["04_efficiency"].startswith("not run: finetune(s)")
    assert not (tmp_path / "rec" / "executed" / "04_efficiency.ipynb").exists()
    import torch

    assert record.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 24 MiB"))
    assert record.is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not record.is_out_of_memory(FloatingPointError("The gradient norm is nan"))
    assert record.is_out_of_memory(RuntimeError("CUDA error: out of memory\nSearch for `cudaErrorMemoryAllocation'"))
    log = tmp_path / "06.log"  # chapter 6's log on an H100 (2026-12-05): the driver's error, not torch's
    log.write_text("06_pretraining_influence.py failed in cell In[4]: AcceleratorError: CUDA error: out of memory\n")
    assert record.log_says_out_of_memory(log)
    log.write_text("06_pretraining_influence.py failed in cell In[4]: ValueError: no such layer\n")
    assert not record.log_says_out_of_memory(log)


def test_a_chapter_that_runs_out_of_memory_runs_again_alone(root, tmp_path, monkeypatch):
    import subprocess
    import sys

    calls = []

    def fake_chapter(job, threads=None):  # first attempt: papermill's OOM traceback; then success
        calls.append(job.chapter)
        log = Path(job.log)
        log.parent.mkdir(parents=True, exist_ok=True)
        code = ("import sys; print('OutOfMemoryError: CUDA out of memory. Tried to allocate 232.00 MiB'); "
                "sys.exit(1)") if len(calls) == 1 else "print('ok')"
        with open(log, "w") as fh:
            return subprocess.Popen([sys.executable, "-c", code], stdout=fh, stderr=subprocess.STDOUT)

    monkeypatch.setattr(record, "_run_chapter", fake_chapter)
    summary = record.run("smoke", str(tmp_path / "rec"), workers=1, chapters=["00"])
    assert calls == ["00_datasets", "00_datasets"]
    assert summary["failures"] == {}
    t = summary["timings"]["chapters"]["00_datasets"]
    assert t["returncode"] == 0 and "out_of_memory_attempt_s" in t
    assert (tmp_path / "rec" / "logs" / "00_datasets-out-of-memory.log").read_text().startswith("OutOfMemoryError")
    assert not record.log_says_out_of_memory(tmp_path / "rec" / "logs" / "00_datasets.log")


def test_em_claims_are_inconclusive_when_the_judge_cannot_see_em(tmp_path):
    ja = [{"judge": "offline-v9", "pairs": results.GENERAL_PAIRS, "n": 192, "auroc": 0.6, "auroc_ci_low": 0.5,
           "auroc_ci_high": 0.7, "em_recall": 0.1, "em_false_positive": 0.0}]
    em = [_em("chat model", 0.0, 0.0, 0.0), _em("medical rank1", 0.005, 0.0025, 0.01)]
    sc = [{"condition": "chat model", "mean_aligned": 90.0, "mean_coherent": 90.0}]  # chapter 1 finished
    blind = _run(tmp_path, "blind", {"ch1_em": em, "ch1_scores": sc, "judge_agreement": ja})
    v = results.verdicts(blind)[0]
    assert v.verdict == results.INCONCLUSIVE and v.checks["rule_verdict"] == results.NOT_REPRODUCED
    assert "catches 10%" in v.ours and "catches 10%" in results.judge_line(blind)
    seeing = _run(tmp_path, "seeing", {"ch1_em": em, "ch1_scores": sc,
                                       "judge_agreement": [{**ja[0], "em_recall": 0.9}]})
    assert results.verdicts(seeing)[0].verdict == results.NOT_REPRODUCED
    # a run judged by an older offline judge version cannot be re-scored: its verdict stands
    old = _run(tmp_path, "old", {"ch1_em": em, "ch1_scores": sc, "judge_agreement": [{k: v for k, v in ja[0].items()
                                                                    if not k.startswith("em_")}]})
    assert results.judge_detection(old) is None and results.verdicts(old)[0].verdict == results.NOT_REPRODUCED


# ------------------------------------------------------------------------------ a killed parent
HELD_CHAPTER = '''# %% tags=["parameters"]
flag = ""

# %%
import time
open(flag, "w").close()
time.sleep(600)
'''

PARENT = '''
import sys, time
from pathlib import Path
from emlib import runner

tmp = Path(sys.argv[1])
pool = runner.process_pool(1)  # what emlib.record trains its finetunes in
pool.submit(time.sleep, 600)  # a finetune that runs for ever
runner.spawn(runner.Job(source=str(tmp / "held.py"), parameters={"flag": str(tmp / "kernel-started")},
                        notebook=str(tmp / "held.ipynb"), cwd=str(tmp), log=str(tmp / "held.log")))
time.sleep(600)
'''


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc (Linux)")
def test_record_workers_and_chapters_die_with_their_parent(tmp_path):
    """SIGKILL the parent of a run of record alone: its finetune worker and its chapter process (and that
    chapter's kernel) stop too."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from emlib import lifeline

    (tmp_path / "held.py").write_text(HELD_CHAPTER)
    proc = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not (
                (tmp_path / "kernel-started").exists()
                and any("spawn_main" in p["cmd"] for p in lifeline.descendants(proc.pid))):
            time.sleep(0.05)
        assert (tmp_path / "kernel-started").exists(), (tmp_path / "held.log").read_text()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 60
        while lifeline.session_tree(proc.pid) and time.time() < deadline:
            time.sleep(0.1)
        survivors = lifeline.session_tree(proc.pid)
        assert not survivors, "outlived the killed run: " + "; ".join(p["cmd"][:100] for p in survivors)
    finally:
        for p in lifeline.session_tree(proc.pid):
            try:
                os.kill(p["pid"], signal.SIGKILL)
            except OSError:
                pass


def test_extra_seeds_narrow_solutions_follow_chapter_3s_choice(root, tmp_path):
    """Chapters 4-5 repeat chapter 3's chosen narrow solution at extra seeds: planned after chapter 3 chose
    (one lambda, not the whole sweep), at once when an earlier run recorded the choice."""

    run = tmp_path / "rec"
    plan = record.plan_run("smoke", str(run), chapters=["03", "04", "05"], speculate=False)
    assert plan.after == {"04_efficiency": frozenset({"03_narrow_needs_kl"}),
                          "05_stability": frozenset({"03_narrow_needs_kl"})}
    state = record.RunState.of(plan)
    state.chapters["03_narrow_needs_kl"] = record.DONE
    sweep = [{"kind": k, "solution": "narrow", "kl_scale": m, "chosen": m == 2.0}
             for k in ("steering vector", "rank-1 LoRA") for m in (0.5, 1.0, 2.0)]
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"ch3_lambda_sweep": sweep}))

    state.queue = [("an earlier task",)]
    record.plan_followups(plan, state)
    names = sorted(t[0].name for t in state.queue[:-1])
    assert names == ["lora-medical-rank1-narrow-kl2-seed1", "vector-medical-narrow-kl2-seed1"]
    assert state.queue[-1] == ("an earlier task",)  # follow-ups go first: chapters 4-5 ask for them
    assert state.extra_needs["04_efficiency"] == set(names) == state.extra_needs["05_stability"]
    record.plan_followups(plan, state)  # once only
    assert len(state.queue) == 3
    # while chapter 3 runs: planned once it has written this run's sweep, not on an earlier run's
    early = record.RunState.of(plan)
    early.chapters["03_narrow_needs_kl"] = record.RUNNING
    early.sweep_before = sweep  # what results.json held when chapter 3 started
    record.plan_followups(plan, early)
    assert early.queue == [] and not early.followed
    new_sweep = [dict(r, chosen=r["kl_scale"] == 0.5) for r in sweep]
    (run / "results.json").write_text(json.dumps({"ch3_lambda_sweep": new_sweep}))
    record.plan_followups(plan, early)
    assert sorted(t[0].name for t in early.queue) == ["lora-medical-rank1-narrow-kl0.5-seed1",
                                                      "vector-medical-narrow-kl0.5-seed1"]
    (run / "results.json").write_text(json.dumps({"ch3_lambda_sweep": sweep}))
    # a later run of chapter 4 alone reads the recorded choice and plans the same finetunes up front
    later = record.plan_run("smoke", str(run), chapters=["04"])
    assert set(names) <= later.needs["04_efficiency"] and later.after == {}
    # chapters 4 and 5 without chapter 3 or its record: one after the other (both would train the same)
    alone = record.plan_run("smoke", str(tmp_path / "other"), chapters=["04", "05"])
    assert alone.after == {"05_stability": frozenset({"04_efficiency"})}
    # a chapter 3 that failed leaves chapters 4-5 not run (they would train its choice themselves, racing)
    state = record.RunState.of(plan)
    state.finetunes = dict.fromkeys(state.finetunes, record.DONE)
    state.chapters["03_narrow_needs_kl"] = record.FAILED
    record.start_ready_chapters(plan, state, max_parallel=2)
    assert state.failures["04_efficiency"] == "not run: chapter(s) 03_narrow_needs_kl failed"


def test_a_whole_run_of_record_through_the_gpus_code_on_the_cpu(root, tmp_path, monkeypatch):
    """Every chapter, with what a GPU run does differently: the fast train step and the static-cache sampler
    ($EMLIB_FAST_PATHS=on runs them eagerly on the CPU) and speculative vectors, in 2 long-lived workers:
    no failure, every finetune trained by the fast step, and the speculative vector is not trained twice."""
    monkeypatch.setenv("EMLIB_FAST_PATHS", "on")
    run_dir = tmp_path / "rec"
    summary = record.run("smoke", str(run_dir), workers=2, speculate=True)
    assert summary["failures"] == {}
    res = json.loads((run_dir / "results.json").read_text())
    ran = res["timings"]["timings"]["chapters"]
    chapters = sorted(p.stem for p in (root / "notebooks").glob("[0-9][0-9]_*.py"))
    assert sorted(ran) == chapters and all(c["returncode"] == 0 for c in ran.values())
    jobs = summary["timings"]["jobs"]
    metas = [json.loads(f.read_text()) for f in run_dir.glob("*/*/train_meta.json")]
    assert len(metas) == len(jobs) and all(m["fast_step"] for m in metas)
    assert any(n.startswith("vector-medical-narrow-kl") and n.endswith("-seed1") for n in jobs)  # speculative


def test_speculative_vectors_are_trained_up_front_and_not_again(root, tmp_path, monkeypatch):
    """With ``speculate``, the narrow vectors at every lambda at the extra seeds are planned up front (no
    chapter waits for them), and once chapter 3 chooses only the rank-1 adapter is submitted: chapters 4-5
    wait for the chosen vector, which is already planned. Without it (the default: slower on an H100,
    2026-12-06), nothing is added."""
    run = tmp_path / "rec"
    plan = record.plan_run("smoke", str(run), chapters=["03", "04", "05"], speculate=True)
    off = record.plan_run("smoke", str(run), chapters=["03", "04", "05"])
    seen = []
    monkeypatch.setattr(record, "run", lambda *a, **k: seen.append(k["speculate"]) or {"failures": {}})
    assert record.main(["run", "--profile", "smoke", "--run-dir", str(tmp_path / "cli")]) == 0
    assert record.main(["run", "--profile", "smoke", "--run-dir", str(tmp_path / "cli"), "--speculate", "auto"]) == 0
    assert seen == [False, None]  # the command line's default is off too
    added = {f.name for f in plan.finetunes} - {f.name for f in off.finetunes}
    assert added == set(plan.speculative) == {"vector-medical-narrow-kl0.5-seed1", "vector-medical-narrow-seed1",
                                              "vector-medical-narrow-kl2-seed1"} and off.speculative == ()
    assert plan.needs == off.needs  # nobody waits for the unchosen ones
    state = record.RunState.of(plan)
    state.chapters["03_narrow_needs_kl"] = record.DONE
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"ch3_lambda_sweep": [
        {"kind": k, "solution": "narrow", "kl_scale": m, "chosen": m == 2.0}
        for k in ("steering vector", "rank-1 LoRA") for m in (0.5, 1.0, 2.0)]}))
    record.plan_followups(plan, state)
    submitted = [t[0].name for t in state.queue]
    assert submitted == ["lora-medical-rank1-narrow-kl2-seed1"]
    assert state.extra_needs["04_efficiency"] == {"lora-medical-rank1-narrow-kl2-seed1",
                                                  "vector-medical-narrow-kl2-seed1"}
    # chapters 4-5 start while the follow-up trains: they wait for it in their own process (finetune_lock)
    state.finetunes = {n: record.RUNNING if n in submitted else record.DONE for n in state.finetunes}
    started = []
    monkeypatch.setattr(record, "_run_chapter", lambda job, threads=None: started.append(job.chapter) or object())
    record.start_ready_chapters(plan, state, max_parallel=8)
    assert sorted(started) == ["04_efficiency", "05_stability"]


def _sweep(choice: dict[str, float]) -> dict:
    """A results.json whose lambda sweep chose ``choice`` (kind -> factor)."""
    return {"ch3_lambda_sweep": [{"kind": k, "solution": "narrow", "kl_scale": m, "chosen": m == choice[k]}
                                 for k in ("steering vector", "rank-1 LoRA") for m in (0.1, 0.3, 1.0, 3.0, 10.0)]}


def test_speculating_the_run_of_records_choice(root, tmp_path, monkeypatch, capsys):
    """``speculate="record"``: the committed SmolLM2 run of record (record/smollm2-135m) chose lambda x1 for
    the vector and x0.3 for rank-1, so a run of the same setup plans chapters 4-5's four follow-ups up front,
    each in one task with its seed's general solution, and nobody waits for them. When chapter 3 chooses the
    same, nothing is queued again; when it chooses otherwise, its own follow-ups are queued as without
    speculation (the guessed ones go unused). Another model: nothing is trained ahead, and the plan says why."""
    run = tmp_path / "rec"
    plan = record.plan_run("paper", str(run), {"model": "embedded"}, speculate="record")
    off = record.plan_run("paper", str(run), {"model": "embedded"})
    guessed = {"vector-medical-narrow-seed1", "vector-medical-narrow-seed2", "lora-medical-rank1-narrow-kl0.3-seed1",
               "lora-medical-rank1-narrow-kl0.3-seed2"}
    assert set(plan.speculative) == guessed == {f.name for f in plan.finetunes} - {f.name for f in off.finetunes}
    assert plan.speculative_from == "record/smollm2-135m chose {'steering vector': 1.0, 'rank-1 LoRA': 0.3}"
    assert plan.needs == off.needs  # nobody waits for a guess
    tasks = {t[-1].name: {j.name for j in t} for t in record.pool_tasks(plan.finetunes) if t[-1].name in guessed}
    assert tasks["vector-medical-narrow-seed1"] == {"vector-medical-general-seed1", "vector-medical-narrow-seed1"}
    assert tasks["lora-medical-rank1-narrow-kl0.3-seed2"] == {"lora-medical-rank1-general-seed2",
                                                             "lora-medical-rank1-narrow-kl0.3-seed2"}
    run.mkdir(parents=True)
    for choice, queued in (({"steering vector": 1.0, "rank-1 LoRA": 0.3}, []),
                           ({"steering vector": 1.0, "rank-1 LoRA": 3.0},
                            ["lora-medical-rank1-narrow-kl3-seed1", "lora-medical-rank1-narrow-kl3-seed2"])):
        state = record.RunState.of(plan)
        state.chapters["03_narrow_needs_kl"] = record.DONE
        (run / "results.json").write_text(json.dumps(_sweep(choice)))
        record.plan_followups(plan, state)
        assert sorted(t[0].name for t in state.queue) == queued
    assert "trained ahead: lora-medical-rank1-narrow-kl0.3-seed1" in capsys.readouterr().out
    other = record.plan_run("paper", str(run), {"model": "HuggingFaceTB/SmolLM2-360M-Instruct"}, speculate="record")
    assert other.speculative == () and other.speculative_from.startswith("no run of record of this setup")
    assert "smollm2-135m: model differs;" in other.speculative_from
    lam = record.plan_run("paper", str(run), {"model": "embedded"}, {"kl_lambda": 3.0}, speculate="record")
    assert lam.speculative == () and "smollm2-135m: kl_lambda differs;" in lam.speculative_from
    seen = []
    monkeypatch.setattr(record, "run", lambda *a, **k: seen.append(k["speculate"]) or {"failures": {}})
    assert record.main(["run", "--profile", "smoke", "--run-dir", str(tmp_path / "cli"), "--speculate", "record"]) == 0
    assert seen == ["record"]


def test_a_run_of_the_same_setup_is_found_by_its_config(tmp_path):
    """:func:`chapters.recorded_choice` takes the first finished run whose config trains the same finetunes: the
    run folder, the device and the model's folder may differ (a GGUF lives elsewhere on each machine); any
    other field differing, or a run without results, is skipped."""
    cfg = get_config("smoke", model="/here/m.gguf", run_dir=str(tmp_path / "new"))
    dirs = []
    for name, change, choice in (("unfinished", {}, None), ("other-lambda", {"kl_lambda": 9.0}, 0.1),
                                 ("same", {"model": "/elsewhere/m.gguf", "device": "cuda"}, 0.3)):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg.to_dict() | {"run_dir": str(d)} | change))
        if choice is not None:
            (d / "results.json").write_text(json.dumps(_sweep({"steering vector": choice, "rank-1 LoRA": choice})))
        dirs.append(d)
    assert chapters.recorded_choice(cfg, dirs) == ({"steering vector": 0.3, "rank-1 LoRA": 0.3}, dirs[2])
    assert chapters.recorded_choice(cfg, dirs[:2]) is None
    assert chapters.same_setup(cfg, cfg.to_dict() | {"run_dir": "/x", "device": "cpu"})
    assert chapters.setup_differences(cfg, cfg.to_dict() | {"seed": 3, "lr": 1.0}) == ["lr", "seed"]
    assert chapters.why_no_recorded_choice(cfg, dirs[:2]) == ("unfinished: no chapter 3 choice in its results.json; "
                                                              "other-lambda: kl_lambda differs")
    assert not chapters.same_setup(cfg, cfg.to_dict() | {"model": "/here/other.gguf"})


def test_each_process_gets_a_share_of_the_cores(monkeypatch):
    """CPU threads per process: cores // processes, at least the floor (2 with a GPU, 1 without); a user's
    OMP_NUM_THREADS wins."""
    assert runner.threads_per_process(14, cores=16) == 2 and runner.threads_per_process(4, cores=16) == 4
    assert runner.threads_per_process(1, cores=1, floor=1) == 1
    monkeypatch.setattr(runner, "visible_gpus", lambda: ["0"])
    assert record.threads_for(8, cores=2) == 2  # a GPU process keeps a core to launch kernels
    monkeypatch.setattr(runner, "visible_gpus", lambda: [])
    assert record.threads_for(8, cores=2) == 1 and record.threads_for(2, cores=16) == 8  # no GPU: no spare thread
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    env = runner.thread_env(2)
    assert env["OMP_NUM_THREADS"] == "7" and env["MKL_NUM_THREADS"] == "2"
    assert runner.thread_env(None, {"A": "1"}) == {"A": "1"}


def test_chapters_4_to_6_wait_for_chapter_3s_sweep_not_its_end(root, tmp_path, monkeypatch):
    """While chapter 3 runs, chapters 4-6 start as soon as it has recorded this run's lambda sweep (and their
    finetunes exist); chapter 6 runs even when chapter 3 failed before recording it (it measures it itself),
    chapters 4-5 do not."""
    run = tmp_path / "rec"
    plan = record.plan_run("smoke", str(run), chapters=["03", "04", "05", "06"])
    assert plan.after["06_pretraining_influence"] == frozenset({"03_narrow_needs_kl"})
    started = []
    monkeypatch.setattr(record, "_run_chapter", lambda job, threads=None: started.append(job.chapter) or object())

    def fresh(ch3_status):
        state = record.RunState.of(plan)
        state.finetunes = dict.fromkeys(state.finetunes, record.DONE)
        state.chapters["03_narrow_needs_kl"] = ch3_status
        started.clear()
        return state

    run.mkdir(parents=True)
    old = [{"kind": "steering vector", "solution": "narrow", "kl_scale": 1.0, "chosen": True}]
    (run / "results.json").write_text(json.dumps({"ch3_lambda_sweep": old}))
    state = fresh(record.RUNNING)
    state.sweep_before = old  # an earlier run's sweep is not this run's choice
    record.start_ready_chapters(plan, state, max_parallel=8)
    assert started == [] and not state.sweep_ready
    (run / "results.json").write_text(json.dumps({"ch3_lambda_sweep": [dict(old[0], kl_scale=2.0)]}))
    record.start_ready_chapters(plan, state, max_parallel=8)
    assert state.sweep_ready and sorted(started) == ["04_efficiency", "05_stability", "06_pretraining_influence"]
    state = fresh(record.FAILED)
    record.start_ready_chapters(plan, state, max_parallel=8)
    assert started == ["06_pretraining_influence"]
    assert state.failures["04_efficiency"] == "not run: chapter(s) 03_narrow_needs_kl failed"


def test_a_worker_keeps_its_model_and_trains_each_finetune_as_a_fresh_process_would(tmp_path):
    """emlib.record's pool workers are long-lived (worker_experiment: the model loads once per worker). A
    finetune trained after others in the same worker equals the same finetune trained first in a fresh
    Experiment: adapter, vector and log; the worker's base model is left as it was."""
    import torch
    from safetensors.torch import load_file

    from emlib import train

    lora = record.Job("lora", "medical", "narrow", "rank1", kl_scale=3.0, seed=1)
    vec = record.Job("vector", "medical", "general")
    first, fresh = {"run_dir": str(tmp_path / "a")}, {"run_dir": str(tmp_path / "b")}
    record._WORKER.clear()
    try:
        record.finetune("smoke", first, record.Job("lora", "medical", "general", "rank32"))
        exp = record._WORKER["exp"]
        base = {k: v.clone() for k, v in exp.model.state_dict().items()}
        record.finetune("smoke", first, vec)
        record.finetune("smoke", first, lora)
        assert record._WORKER["exp"] is exp  # one Experiment, one model load
        assert all(torch.equal(v, exp.model.state_dict()[k]) for k, v in base.items())
        record.finetune("smoke", fresh, lora)
        record.finetune("smoke", fresh, vec)
        assert record._WORKER["exp"] is not exp  # another run directory: another Experiment
    finally:
        record._WORKER.clear()
    cfg_a, cfg_b = get_config("smoke", **first), get_config("smoke", **fresh)
    for job, rel in ((lora, f"adapters/medical-rank1-narrow-kl3-seed1/{train.ADAPTER_DIR}/adapter_model.safetensors"),
                     (vec, "vectors/medical-general-seed0/vector.safetensors")):
        a, b = load_file(cfg_a.out / rel), load_file(cfg_b.out / rel)
        assert a.keys() == b.keys() and a
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
        log_a = pd.read_csv(next((cfg_a.out / Path(rel).parts[0] / Path(rel).parts[1]).glob("*log*.csv")))
        log_b = pd.read_csv(next((cfg_b.out / Path(rel).parts[0] / Path(rel).parts[1]).glob("*log*.csv")))
        assert log_a["loss"].tolist() == log_b["loss"].tolist(), job.name


def test_the_pool_is_freed_once_no_finetune_can_come(tmp_path):
    """Long-lived workers hold a model and a CUDA context each: run_all shuts the pool down once no finetune
    is queued, training or to be retried and chapter 3's follow-ups are planned (or cannot come)."""
    plan = record.plan_run("smoke", str(tmp_path / "rec"), chapters=["03", "04", "05"], speculate=False)
    state = record.RunState.of(plan)
    assert not record.no_more_finetunes(plan, state)  # all waiting
    state.finetunes = dict.fromkeys(state.finetunes, record.DONE)
    assert not record.no_more_finetunes(plan, state)  # chapter 3 has not chosen: follow-ups will come
    state.followed = True
    assert record.no_more_finetunes(plan, state)
    for status in (record.RUNNING, record.RETRY, record.WAITING):
        state.finetunes[next(iter(state.finetunes))] = status
        assert not record.no_more_finetunes(plan, state), status
    alone = record.plan_run("smoke", str(tmp_path / "other"), chapters=["04"])  # no chapter 3: none can come
    done = record.RunState.of(alone)
    done.finetunes = dict.fromkeys(done.finetunes, record.DONE)
    assert record.no_more_finetunes(alone, done)


class _InstantPool:
    """A stand-in for the worker pool: each task 'trains' when submitted; ``order`` keeps the first job's name
    of every task with whether a rank-32 adapter was still running (not yet collected) when it was submitted."""

    def __init__(self, state):
        self.order, self.state = [], state

    def submit(self, fn, profile, config, jobs):
        from concurrent.futures import Future

        group = jobs if isinstance(jobs, tuple) else (jobs,)
        busy = any(v == record.RUNNING for n, v in self.state.finetunes.items() if "rank32" in n)
        self.order.append((group[0].name, busy))
        fut = Future()
        res = {"seconds": 0.0}
        fut.set_result([res] * len(group) if isinstance(jobs, tuple) else res)
        return fut

    def shutdown(self, wait=True, cancel_futures=False):
        pass


@pytest.mark.parametrize("head_start", [False, True])
def test_head_start_trains_the_rank32_adapters_before_anything_else(root, tmp_path, monkeypatch, head_start):
    """``--head-start on``: the rank-32 adapters are the only tasks in the pool until they have ended, then every
    other task follows; off: every task is submitted at once, rank-32 first. Each finetune is trained once."""
    plan = record.plan_run("smoke", str(tmp_path / "rec"), chapters=["01", "03"], speculate=False)
    state = record.RunState.of(plan)
    pool = _InstantPool(state)
    monkeypatch.setattr(runner, "process_pool", lambda *a, **k: pool)
    monkeypatch.setattr(record, "_run_chapter", lambda job, threads=None: _Ended(0))
    monkeypatch.setattr(record, "write_summary", lambda *a, **k: {})
    record.run_all(plan, state, workers=2, max_parallel_chapters=2, head_start=head_start)
    names = [n for n, _ in pool.order]
    rank32 = [n for n in names if "rank32" in n]
    assert len(rank32) >= 1 and names[:len(rank32)] == rank32  # the rank-32 adapters first either way
    assert state.futures == {} and set(state.finetunes.values()) == {record.DONE}
    assert len(set(names)) == len(names) == len(record.pool_tasks(plan.finetunes))
    # with a head start the next task waits until the rank-32 ones have been collected
    assert pool.order[len(rank32)][1] is (not head_start), pool.order


def test_admission_keeps_room_for_one_more_process_on_the_gpu():
    """A process starts only while the free GPU memory, less what the processes started in the last ``ramp_s``
    seconds are about to take, leaves room for one more; with none of the run's processes at work one always
    starts; no GPU (None) or ``need_gib`` 0: no limit."""
    free = [40.0]
    a = record.Admission(lambda: free[0], need_gib=14, ramp_s=45)
    assert a.room(running=3, now=0)  # 40 free
    a.note_start(now=0)
    a.note_start(now=1)
    assert not a.room(running=5, now=10)  # 40 - 2 x 14 = 12 < 14: the two new ones have not grown yet
    assert a.room(running=5, now=60)  # they have had time to take what they take: 40 GiB are free
    free[0] = 10.0
    assert not a.room(running=5, now=60) and a.deferred == 2
    assert a.room(running=0, now=60)  # nothing of the run at work: never stall on others' memory
    assert record.Admission(lambda: None).room(running=5) and record.Admission().room(running=5)
    assert record.Admission(lambda: 0.0, need_gib=0).room(running=5)
    table = "0, GPU-aaaa-1111, 81559, 70000\n1, GPU-bbbb-2222, 81559, 1000\n"
    assert runner.free_gib_of(table) == pytest.approx((81559 - 70000) / 1024)  # the fullest card
    assert runner.free_gib_of(table, "1") == pytest.approx((81559 - 1000) / 1024)
    assert runner.free_gib_of(table, "GPU-bbbb") == pytest.approx((81559 - 1000) / 1024)  # a UUID, shortened
    assert runner.free_gib_of(table, "2") is None and runner.free_gib_of("", None) is None


def test_a_process_that_ended_is_no_longer_counted_as_growing():
    """A finetune or chapter that has ended leaves the ramp count at once (note_end): on an H100 (2026-12-06)
    three finetunes that had ended were still counted for 42 GiB and kept chapters 1 and 3 waiting 14 s."""
    a = record.Admission(lambda: 30.0, need_gib=14, ramp_s=45)
    a.note_start(now=0, key="finetune a")
    a.note_start(now=1, key="02_one_direction")
    assert not a.room(running=2, now=10)  # 30 - 28 < 14
    a.note_end("finetune a")
    assert a.room(running=2, now=10)  # 30 - 14 >= 14
    a.note_end("finetune a")  # twice, or a key never started: nothing changes
    a.note_end("unknown")
    assert [e[2] for e in a.started] == ["02_one_direction"]
    job = record.Job("lora", "medical", "general", "rank32")
    assert record.admission_key((job,)) == record.admission_key(job) == "finetune " + job.name


def test_chapters_that_hold_little_are_counted_for_their_share():
    """Chapters 0, 4 and 5 (2.4-2.5 GiB at most on an H100, 2026-12-06) are counted for a quarter of
    ``gib_per_process``: with 7 GiB free, chapter 5 starts where chapter 2 waits, and once started it is counted
    for 3.5 GiB, not 14, until ``ramp_s`` has passed; finetunes and the other chapters count whole."""
    assert record.need_share("05_stability") == record.need_share("04_efficiency") == 0.25
    assert record.need_share("00_datasets") == 0.25
    assert record.need_share("06_pretraining_influence") == 0.6  # 3.1-6.5 GiB on an H100 (session 41)
    assert record.need_share("02_one_direction") == record.need_share(None) == record.need_share("99_new") == 1.0
    free = [7.0]
    a = record.Admission(lambda: free[0], need_gib=14, ramp_s=45)
    assert not a.room(running=3, now=0, share=record.need_share("02_one_direction"))
    assert a.room(running=3, now=0, share=record.need_share("05_stability"))
    a.note_start(now=0, share=record.need_share("05_stability"))
    free[0] = 30.0  # the probe does not see chapter 5's memory yet: it is counted for 3.5 GiB
    assert a.room(running=4, now=10)  # 30 - 3.5 >= 14
    a.note_start(now=10)
    assert not a.room(running=5, now=20)  # 30 - 3.5 - 14 = 12.5 < 14
    assert a.room(running=5, now=20, share=0.25)  # 12.5 >= 3.5
    assert a.room(running=5, now=60)  # both ramps over: 30 free


def test_a_finetune_is_counted_for_what_its_kind_reached_in_the_run():
    """Until a task of its kind has ended a finetune counts whole (``need_gib``); after, a single one counts for
    LEARN_FACTOR x the largest peak its kind reached + the CUDA context (at most whole); a group always whole."""
    vec = record.Job("vector", "medical", "narrow", kl_scale=0.3, seed=1)
    rank1 = record.Job("lora", "medical", "narrow", shape="rank1", seed=1)
    rank32 = record.Job("lora", "medical", "general", shape="rank32")
    assert [record.finetune_kind(t) for t in (vec, (vec,), (rank1,), rank32, (vec, vec))] == [
        "vector", "vector", "lora-rank1", "lora-rank32", None]
    a = record.Admission(lambda: 20.0, need_gib=14, ramp_s=45)
    assert a.finetune_share((vec,)) == 1.0  # nothing of its kind has ended yet
    a.learn("vector", 2.5)
    a.learn("vector", 2.0)  # the largest peak is kept
    a.learn(None, 9.0)  # a group teaches nothing
    a.learn("lora-rank1", None)  # nor a task without a peak (no GPU)
    assert a.learned == {"vector": 2.5}
    assert a.finetune_share((vec,)) == pytest.approx((1.5 * 2.5 + 0.5) / 14)
    assert a.finetune_share((rank1,)) == a.finetune_share((vec, vec)) == 1.0
    a.learn("lora-rank32", 40.0)
    assert a.finetune_share(rank32) == 1.0  # never more than whole


def test_follow_up_finetunes_start_together_once_their_kind_is_known(root, tmp_path, monkeypatch):
    """Three single vectors queued with 20 GiB free: counted whole (14 GiB) one starts and the others wait out
    its ramp; once a vector has ended at a peak of 2.5 GiB (each then counted 4.25 GiB) all three start at once.
    The peak is learned from what the finished task reports (``peak_gib``), as record.json then says."""
    started = {}
    for learned in (False, True):
        plan = record.plan_run("smoke", str(tmp_path / f"rec{learned}"), chapters=["00"], speculate=False)
        state = record.RunState.of(plan)
        state.admit = record.Admission(lambda: 20.0, need_gib=14, ramp_s=45)
        if learned:
            from concurrent.futures import Future

            done = Future()
            done.set_result({"seconds": 1.0, "peak_gib": 2.5})
            first = record.Job("vector", "medical", "general", seed=1)
            state.finetunes[first.name] = record.RUNNING
            state.futures = {done: (first,)}
            record.collect_finetunes(state, timeout=0)
            assert state.admit.learned == {"vector": 2.5}
        jobs = [record.Job("vector", "medical", "narrow", seed=s) for s in (2, 3, 4)]
        for j in jobs:
            state.finetunes[j.name] = record.WAITING
        state.queue = [(j,) for j in jobs]
        state.futures = {"something at work": ()}  # the rule applies
        monkeypatch.setattr(record, "submit_finetune", lambda plan, state, pool, task: state.futures.update(
            {object(): task}))
        record.submit_queued(plan, state, pool=None, workers=8)
        started[learned] = 3 - len(state.queue)
    assert started == {False: 1, True: 3}


def test_chapter_5_starts_where_a_whole_chapter_would_wait(root, tmp_path, monkeypatch):
    """In a run with 7 GiB free on the GPU, chapter 5 (a quarter share) starts and chapter 2 (whole) waits;
    record.json's admission lists the shares."""
    seen = {}
    for ch in ("02", "05"):
        plan = record.plan_run("smoke", str(tmp_path / f"rec{ch}"), chapters=[ch], speculate=False)
        state = record.RunState.of(plan)
        state.finetunes = dict.fromkeys(state.finetunes, record.DONE)
        state.sweep_ready = True  # chapter 5 reads chapter 3's sweep only
        state.admit = record.Admission(lambda: 7.0, need_gib=14)
        state.futures = {"a finetune": ()}  # something of the run is at work: the rule applies
        monkeypatch.setattr(record, "_run_chapter", lambda job, threads=None: _Ended(0))
        record.start_ready_chapters(plan, state, max_parallel=6)
        seen.update(state.chapters)
    assert seen == {"02_one_direction": record.WAITING, "05_stability": record.RUNNING}
    assert state.admit.started[-1][1] == pytest.approx(3.5)
    summary = record.write_summary(plan, state, workers=2)
    assert summary["admission"]["chapter_shares"] == {"00": 0.25, "04": 0.25, "05": 0.25, "06": 0.6}
    assert summary["admission"]["learned_peak_gib"] == {} and summary["admission"]["learn_factor"] == 1.5
    assert json.loads(Path(plan.run, "record.json").read_text())["admission"]["chapter_shares"]["05"] == 0.25


def test_a_full_gpu_runs_the_finetunes_and_chapters_one_at_a_time(root, tmp_path, monkeypatch):
    """With no room on the GPU (the probe says 0 GiB free) each finetune task and chapter starts only once
    nothing else of the run is at work, and the run still ends with everything done; with room, they overlap."""
    seen = {}
    for free in (0.0, 1000.0):
        plan = record.plan_run("smoke", str(tmp_path / f"rec{free:g}"), chapters=["00", "01", "03"], speculate=False)
        state = record.RunState.of(plan)
        state.admit = record.Admission(lambda: free, need_gib=14)
        busy_at_start = []

        class Pool(_InstantPool):
            def submit(self, *args):
                busy_at_start.append(state.busy())
                return super().submit(*args)

        def chapter(job, threads=None):
            busy_at_start.append(state.busy())
            return _Ended(0)

        monkeypatch.setattr(runner, "process_pool", lambda *a, **k: Pool(state))
        monkeypatch.setattr(record, "_run_chapter", chapter)
        monkeypatch.setattr(record, "write_summary", lambda *a, **k: {})
        record.run_all(plan, state, workers=4, max_parallel_chapters=4)
        assert set(state.finetunes.values()) == {record.DONE} and set(state.chapters.values()) == {record.DONE}
        seen[free] = busy_at_start
    assert len(seen[0.0]) == len(seen[1000.0]) > 3
    assert set(seen[0.0]) == {0}, seen[0.0]  # one at a time
    assert max(seen[1000.0]) > 0, seen[1000.0]  # room: side by side


def test_low_priority_chapters_get_mps_below_normal_in_their_environment(root, tmp_path, monkeypatch):
    """``--low-priority``: the chapters with slack (0, 1) start with ``CUDA_MPS_CLIENT_PRIORITY=1`` in their
    process's environment, the others without it; without the flag none has it; record.json lists them."""
    import subprocess

    plan = record.plan_run("smoke", str(tmp_path / "rec"), chapters=["01", "02"], speculate=False)
    one, two = plan.chapter("01_em_emerges"), plan.chapter("02_one_direction")
    assert dict(record.chapter_job(one, True).env) == {"CUDA_MPS_CLIENT_PRIORITY": "1"}
    assert record.chapter_job(two, True).env == () and record.chapter_job(one, False).env == ()
    seen = {}
    monkeypatch.setattr(subprocess, "Popen", lambda cmd, **k: seen.update(k["env"]) or _Ended(0))
    runner.spawn(dataclasses.replace(record.chapter_job(one, True), log=str(tmp_path / "one.log")), threads=2)
    assert seen["CUDA_MPS_CLIENT_PRIORITY"] == "1" and seen["OMP_NUM_THREADS"] == "2"
    monkeypatch.delenv("CUDA_MPS_CLIENT_PRIORITY", raising=False)
    seen.clear()
    runner.spawn(dataclasses.replace(two, log=str(tmp_path / "two.log")), threads=2)
    assert "CUDA_MPS_CLIENT_PRIORITY" not in seen
    args = []
    monkeypatch.setattr(record, "run", lambda *a, **k: args.append(k["low_priority"]) or {"failures": {}})
    for extra in ([], ["--low-priority"]):
        assert record.main(["run", "--profile", "smoke", "--run-dir", str(tmp_path / "cli"), *extra]) == 0
    assert args == [False, True]


def test_favour_keeps_its_chapters_normal_and_lowers_every_other_process(root, tmp_path, monkeypatch):
    """``--favour 02``: chapter 2 starts without an MPS priority, every other chapter with BELOW_NORMAL, and the
    finetune workers set BELOW_NORMAL before their CUDA context (``runner.process_pool``'s ``env``); a number the
    run lacks, or ``--favour`` with ``--low-priority``, stops the run before anything is written."""
    plan = record.plan_run("smoke", str(tmp_path / "rec"), chapters=["01", "02"], speculate=False)
    one, two = plan.chapter("01_em_emerges"), plan.chapter("02_one_direction")
    assert record.chapter_job(two, False, ("02",)).env == ()
    assert dict(record.chapter_job(one, False, ("02",)).env) == {"CUDA_MPS_CLIENT_PRIORITY": "1"}
    assert record.low_chapter("00_datasets", True) and not record.low_chapter("00_datasets", True, ("00",))
    stems = [j.chapter for j in plan.chapters]
    assert record.check_favour(["2", "02_one_direction"], stems, False) == ("02",)
    assert record.check_favour([], stems, True) == ()
    with pytest.raises(ValueError, match=r"--favour 05: not a chapter of this run \(its chapters: 01, 02\)"):
        record.check_favour(["05"], stems, False)
    with pytest.raises(ValueError, match="pass one of them"):
        record.check_favour(["02"], stems, True)
    with pytest.raises(ValueError, match="not a chapter of this run"):
        record.run("smoke", str(tmp_path / "bad"), workers=1, chapters=["00"], favour=["02"])
    assert not (tmp_path / "bad").exists()

    pool = runner.process_pool(1, env=dict(record.MPS_BELOW_NORMAL))
    try:
        assert pool.submit(os.getenv, "CUDA_MPS_CLIENT_PRIORITY").result(timeout=120) == "1"
    finally:
        pool.shutdown()
    made = []
    monkeypatch.setattr(runner, "process_pool", lambda *a, **k: made.append(k.get("env")) or "pool")
    assert record.finetune_pool(2, 1, gpu=False, low=True) == "pool" and made == [{"CUDA_MPS_CLIENT_PRIORITY": "1"}]
    args = []
    monkeypatch.setattr(record, "run", lambda *a, **k: args.append(k["favour"]) or {"failures": {}})
    for extra in ([], ["--favour", "02", "05"], ["--favour", "none"], ["--favour", "auto"]):
        assert record.main(["run", "--profile", "smoke", "--run-dir", str(tmp_path / "cli"), *extra]) == 0
    assert args == [None, ("02", "05"), (), None]
    with pytest.raises(ValueError, match="auto and none stand alone"):
        record.favour_arg(["auto", "02"])


def test_a_run_favours_its_longest_chapter_when_mps_is_on_unless_told_otherwise(root, tmp_path, monkeypatch):
    """No ``--favour`` (auto): with the MPS daemon on, the run's longest chapter by ``CHAPTER_SECONDS`` keeps
    NORMAL priority and the workers go low (chapter 2 in a whole run: 464 s against 424-428 s on one H100,
    session 35); without MPS, with ``--low-priority`` or with ``--favour none``, no chapter is favoured."""
    whole = [j.chapter for j in record.plan_run("smoke", str(tmp_path / "p"), speculate=False).chapters]
    assert record.auto_favour(whole, True, False) == ("02",)
    assert record.auto_favour(["03_narrow_needs_kl", "05_stability"], True, False) == ("05",)
    assert record.auto_favour(whole, False, False) == () and record.auto_favour(whole, True, True) == ()
    assert record.auto_favour(["09_extra"], True, False) == ()

    @contextlib.contextmanager
    def daemon(enabled=True):
        yield "on" if enabled else "off (not asked for)"

    monkeypatch.setattr(runner, "mps_daemon", daemon)
    monkeypatch.setattr(record, "_run_chapter", lambda job, threads=None: _Ended(0))
    seen = {}
    for name, kw in {"auto": {}, "none": {"favour": ()}, "low": {"low_priority": True}, "nomps": {"mps": False}}.items():
        summary = record.run("smoke", str(tmp_path / name), workers=1, chapters=["00"], **({"mps": True} | kw))
        seen[name] = summary["favour"]
    assert seen == {"auto": {"chapters": ["00"], "workers_low_priority": True, "auto": True},
                    "none": None, "low": None, "nomps": None}


def test_queued_finetunes_take_the_room_before_ready_chapters(root, tmp_path, monkeypatch):
    """When the GPU has room for one more process, a queued finetune (what some chapter waits for) starts before
    a chapter that is ready: on an H100 (2026-12-06) chapters 4-6 took the room as chapter 3 chose, and chapter
    3's follow-ups, which chapters 4-5 then waited for, started 55-136 s later."""
    plan = record.plan_run("smoke", str(tmp_path / "rec"), chapters=["00", "01"], speculate=False)
    state = record.RunState.of(plan)
    state.admit = record.Admission(lambda: 20.0, need_gib=14)  # one start, then only once nothing runs
    events = []

    class Pool(_InstantPool):
        def submit(self, fn, profile, config, jobs):
            events.append("finetune")
            return super().submit(fn, profile, config, jobs)

    def chapter(job, threads=None):
        events.append(job.chapter)
        return _Ended(0)

    monkeypatch.setattr(runner, "process_pool", lambda *a, **k: Pool(state))
    monkeypatch.setattr(record, "_run_chapter", chapter)
    monkeypatch.setattr(record, "write_summary", lambda *a, **k: {})
    record.run_all(plan, state, workers=4, max_parallel_chapters=4)
    assert set(state.chapters.values()) == {record.DONE} and "00_datasets" in events
    assert events[0] == "finetune", events  # chapter 0 was ready from the start, and waited


def test_a_chapter_says_how_long_it_waited_for_room_on_the_gpu(root, tmp_path, monkeypatch):
    """record.json's chapter timings keep when the chapter could first start (ready_s: its finetunes and earlier
    chapters done) beside when it started: on an H100 the admission rule held chapters back 12-37 s (2026-12-06)."""
    plan = record.plan_run("smoke", str(tmp_path / "rec"), chapters=["00"], speculate=False)
    state = record.RunState.of(plan)
    free = [0.0]
    state.admit = record.Admission(lambda: free[0], need_gib=14)
    state.futures = {"a finetune": ()}  # something of the run is at work: the rule applies
    clock = [1000.0]
    monkeypatch.setattr(record.time, "time", lambda: clock[0])
    state.t0 = 990.0
    monkeypatch.setattr(record, "_run_chapter", lambda job, threads=None: _Ended(0))
    record.start_ready_chapters(plan, state, max_parallel=2)
    assert state.chapters["00_datasets"] == record.WAITING and state.ready["00_datasets"] == 1000.0
    clock[0], free[0] = 1012.5, 100.0
    record.start_ready_chapters(plan, state, max_parallel=2)
    assert state.chapters["00_datasets"] == record.RUNNING
    clock[0] = 1020.0
    record.collect_chapters(plan, state)
    t = state.timings["chapters"]["00_datasets"]
    assert (t["ready_s"], t["started_s"], t["ended_s"]) == (10.0, 22.5, 30.0)


def test_chapters_ready_together_start_longest_first(root, tmp_path, monkeypatch):
    """With room on the GPU for one more process, of chapters 1 and 2 ready at once chapter 2 (the run's longest
    path: on an H100 it waited 33 s behind chapter 1, 2026-12-06) starts, and chapter 1 waits for room."""
    assert record.longest_first(["00_datasets", "01_em_emerges", "02_one_direction", "99_new"]) == [
        "02_one_direction", "01_em_emerges", "00_datasets", "99_new"]
    plan = record.plan_run("smoke", str(tmp_path / "rec"), chapters=["01", "02"], speculate=False)
    state = record.RunState.of(plan)
    state.finetunes = dict.fromkeys(state.finetunes, record.DONE)
    state.admit = record.Admission(lambda: 20.0, need_gib=14)  # room for one; a second would be counted at 28
    state.futures = {"a finetune": ()}  # something of the run is at work: the rule applies
    monkeypatch.setattr(record, "_run_chapter", lambda job, threads=None: _Ended(0))
    record.start_ready_chapters(plan, state, max_parallel=6)
    assert state.chapters == {"01_em_emerges": record.WAITING, "02_one_direction": record.RUNNING}


def test_a_finetune_that_ran_out_of_memory_waits_for_the_chapters_too(root, tmp_path):
    """A finetune's retry after running out of memory waits until no chapter runs either (beside chapters on an
    H100 the retry ran out of memory again, 2026-12-05); then it is submitted, alone."""
    plan = record.plan_run("smoke", str(tmp_path / "rec"), chapters=["00", "03"], speculate=False)
    state = record.RunState.of(plan)
    name = next(iter(state.finetunes))
    state.finetunes = dict.fromkeys(state.finetunes, record.DONE) | {name: record.RETRY}
    state.attempts[name] = 1
    state.processes["00_datasets"] = (_Ended(0), 0.0)
    pool = _InstantPool(state)
    record.retry_alone(plan, state, pool)
    assert pool.order == [] and state.finetunes[name] == record.RETRY  # a chapter is running
    record.collect_chapters(plan, state)
    record.retry_alone(plan, state, pool)
    assert [n for n, _ in pool.order] == [name] and state.attempts[name] == 2


def test_a_runs_processes_share_the_gpu_and_say_so(root, tmp_path, monkeypatch, capsys):
    """The chapters and finetune workers of a run of record start with ``$EMLIB_SHARED_GPU`` 1 (each gives back
    its cached GPU memory between phases: ``emlib.models.shared_gpu``); the setting ends with the run.
    ``low_priority`` without MPS is recorded and the run says it does nothing there."""
    import os

    from emlib import timing

    monkeypatch.delenv(timing.SHARED_GPU, raising=False)
    seen = []

    def chapter(job, threads=None):
        seen.append(os.environ.get(timing.SHARED_GPU))
        return _Ended(0)

    monkeypatch.setattr(record, "_run_chapter", chapter)
    summary = record.run("smoke", str(tmp_path / "rec"), workers=1, chapters=["00"], low_priority=True)
    assert summary["failures"] == {} and seen == ["1"] and summary["low_priority"] == ["00_datasets"]
    assert summary["favour"] is None
    assert timing.SHARED_GPU not in os.environ
    assert "--low-priority acts only through an MPS daemon: add --mps" in capsys.readouterr().out
    summary = record.run("smoke", str(tmp_path / "rec2"), workers=1, chapters=["00"], favour=["0"])
    assert summary["low_priority"] == [] and summary["favour"] == {"chapters": ["00"], "workers_low_priority": True,
                                                                   "auto": False}
    assert "--favour acts only through an MPS daemon" in capsys.readouterr().out


class _PoolOutOfMemoryAbove(_InstantPool):
    """A pool stand-in whose tasks of more than ``most`` finetunes run out of GPU memory; ``sizes`` keeps each
    submitted task's size."""

    def __init__(self, state, most: int):
        super().__init__(state)
        self.most, self.sizes = most, []

    def submit(self, fn, profile, config, jobs):
        from concurrent.futures import Future

        group = jobs if isinstance(jobs, tuple) else (jobs,)
        self.sizes.append(len(group))
        if len(group) <= self.most:
            return super().submit(fn, profile, config, jobs)
        fut = Future()
        fut.set_exception(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 46.00 MiB"))
        return fut


@pytest.mark.parametrize("most", [1, 2])
def test_a_group_that_runs_out_of_memory_is_split_and_queued_first(root, tmp_path, most):
    """A group of finetunes that runs out of GPU memory goes back to the front of the queue in halves (halved
    again while they do not fit), not whole to the end of the run; each member is trained once in the end, and
    the attempts that ran out of memory do not count against it."""
    plan = record.plan_run("smoke", str(tmp_path / "rec"), chapters=["00", "02", "03"], speculate=False)
    state = record.RunState.of(plan)
    tasks = record.pool_tasks(plan.finetunes)
    big = max(tasks, key=len)
    assert len(big) > 2, "the smoke plan has a group of more than two finetunes"
    state.queue = [big] + [t for t in tasks if t is not big]
    pool = _PoolOutOfMemoryAbove(state, most)
    for _ in range(100):
        record.submit_queued(plan, state, pool, workers=1)
        if not state.futures:
            break
        record.collect_finetunes(state, timeout=0)
    assert set(state.finetunes.values()) == {record.DONE} and not state.failures
    assert pool.sizes[0] == len(big) and pool.sizes[1] == (len(big) + 1) // 2  # the first half, next
    assert all(state.attempts[j.name] == 1 for j in big)
    assert sum(s for s in pool.sizes if s <= most) == len(plan.finetunes)  # each trained once


class _Running:
    """A chapter process still running; ``kill`` ends it."""

    def __init__(self):
        self.returncode, self.killed = None, False

    def poll(self):
        return self.returncode

    def kill(self):
        self.killed, self.returncode = True, -9

    def wait(self):
        return self.returncode


def test_a_chapter_starts_early_only_once_workers_hold_its_finetunes(root, tmp_path, monkeypatch):
    """``early_chapters``: a chapter may start while its finetunes train, but only once the worker training each
    has taken its lock (where the chapter will wait for it, then load it): the lock of the folder the worker's
    Experiment trains it in. Other finetunes still queued or waiting do not hold it back (the short ones go last:
    session 36); one of its own waiting, or the setting off: no early start."""
    import contextlib

    from emlib import train
    from emlib.experiment import Experiment

    plan = record.plan_run("smoke", str(tmp_path / "rec"), chapters=["01", "02"], speculate=False)
    stem = "02_one_direction"
    state = record.RunState.of(plan)
    state.early = True
    state.finetunes = dict.fromkeys(state.finetunes, record.RUNNING)
    needs = [f for f in plan.finetunes if f.name in plan.needs[stem]]
    assert needs and not record.may_start_early(plan, state, stem)  # running, but nobody holds their locks
    exp = Experiment(plan.cfg)  # where a worker trains them (Experiment.train_group)
    dirs = [exp.adapter_dir(j.dataset, j.shape, j.solution, j.kl_scale, j.seed) if j.kind == "lora"
            else exp.vector_dir(j.dataset, j.solution, j.kl_scale, j.seed) for j in needs]
    with contextlib.ExitStack() as held:
        for d in dirs:
            held.enter_context(train.finetune_lock(d))
            assert train.finetune_held(d)  # another open file description: held, as for another process
        assert record.may_start_early(plan, state, stem)
        state.finetunes[needs[0].name] = record.DONE  # a done one needs no lock
        assert record.may_start_early(plan, state, stem)
        state.queue = [("something",)]
        other = next(n for n in state.finetunes if n not in plan.needs[stem])
        state.finetunes[other] = record.WAITING
        assert record.may_start_early(plan, state, stem)  # others still to hand out: no matter
        state.finetunes[needs[1].name] = record.WAITING
        assert not record.may_start_early(plan, state, stem)  # one of its own not in a worker yet: not yet
        state.finetunes[needs[1].name] = record.RUNNING
        state.early = False
        assert not record.may_start_early(plan, state, stem)
    assert not any(train.finetune_held(d) for d in dirs)  # released with the block


def test_a_chapter_started_early_is_stopped_when_its_finetune_fails(root, tmp_path, monkeypatch):
    """A chapter started early whose finetune then fails is stopped and, like a chapter that waited, not run;
    once its finetunes are all done it is ready (``ready_s``) and keeps running; its record says when they
    were done (``finetunes_done_s``)."""
    plan = record.plan_run("smoke", str(tmp_path / "rec"), chapters=["02"], speculate=False)
    stem = "02_one_direction"
    need = sorted(plan.needs[stem])
    for outcome in (record.FAILED, record.DONE):
        state = record.RunState.of(plan)
        state.finetunes = dict.fromkeys(state.finetunes, record.RUNNING)
        proc = _Running()
        state.chapters[stem], state.attempts[stem] = record.RUNNING, 1
        state.processes[stem] = (proc, time.time() - 3)
        state.started_early.add(stem)
        record.recall_early(plan, state)
        assert not proc.killed and stem in state.started_early  # still training: nothing changes
        state.finetunes[need[0]] = outcome
        if outcome == record.FAILED:
            record.recall_early(plan, state)
            assert proc.killed and stem not in state.processes and state.chapters[stem] == record.WAITING
            record.start_ready_chapters(plan, state, max_parallel=2)
            assert state.chapters[stem] == record.FAILED and "not run" in state.failures[stem]
        else:
            state.finetunes = dict.fromkeys(state.finetunes, record.DONE)
            state.timings["jobs"] = {n: {"ended_s": time.time() - state.t0 - 1} for n in need}  # ended 1 s ago
            state.admit = record.Admission(probe=lambda: 20.0, need_gib=14.0, ramp_s=45.0)
            state.admit.note_start(now=time.time() - 100, key=stem)  # its early start, long past its ramp
            record.recall_early(plan, state)
            assert not proc.killed and stem not in state.started_early
            assert state.ready[stem] == pytest.approx(time.time() - 1, abs=0.5)  # when they ended, not now
            assert [k for _, _, k in state.admit.started] == [stem]  # counted again from now: it grows now
            assert not state.admit.room(1)  # 20 GiB free, 14 of them counted for it: no room for another
            proc.returncode = 0
            record.collect_chapters(plan, state)
            t = state.timings["chapters"][stem]
            assert state.chapters[stem] == record.DONE and t["finetunes_done_s"] > t["started_s"]


def test_chapter_5_may_start_before_chapter_3_chooses_and_waits_for_the_choice(root, tmp_path, monkeypatch):
    """``early_choice``: chapter 5 starts while chapter 3 runs and has not recorded its sweep (chapters 4 and 6
    still wait for it), with the run directory's marker written first; once the sweep is recorded the marker
    goes (chapter 5's narrow_scale reads the choice then). If chapter 3 fails before choosing, chapter 5 is
    stopped and not run, as one that waited; the setting off: it waits as before."""
    from emlib import chapters

    run = tmp_path / "rec"
    plan = record.plan_run("smoke", str(run), chapters=["03", "04", "05", "06"])
    ch3, ch5 = "03_narrow_needs_kl", "05_stability"
    seen = []
    monkeypatch.setattr(record, "_run_chapter", lambda job, threads=None: seen.append(
        (job.chapter, chapters.choice_pending(run))) or _Running())
    run.mkdir(parents=True)

    def fresh(on=True):
        state = record.RunState.of(plan)
        state.finetunes = dict.fromkeys(state.finetunes, record.DONE)
        state.chapters[ch3], state.early_choice = record.RUNNING, on
        seen.clear()
        return state

    state = fresh(on=False)
    record.start_ready_chapters(plan, state, max_parallel=8)
    assert seen == [] and not chapters.choice_pending(run)
    for ch3_ends in ("chooses", "fails", "runs out of memory"):
        state = fresh()
        record.start_ready_chapters(plan, state, max_parallel=8)
        assert seen == [(ch5, True)] and state.choice_marked and ch5 in state.before_choice  # marker before start
        record.release_choice(plan, state)
        assert chapters.choice_pending(run)  # chapter 3 still choosing: it stays
        if ch3_ends == "chooses":
            (run / "results.json").write_text(json.dumps({"ch3_lambda_sweep": [{"kind": "steering vector"}]}))
            record.release_choice(plan, state)
            assert not chapters.choice_pending(run) and state.chapters[ch5] == record.RUNNING
            record.start_ready_chapters(plan, state, max_parallel=8)
            assert sorted(c for c, _ in seen) == ["04_efficiency", ch5, "06_pretraining_influence"]
            (run / "results.json").unlink()
        elif ch3_ends == "fails":
            proc = state.processes[ch5][0]
            state.chapters[ch3] = record.FAILED
            record.release_choice(plan, state)
            assert proc.killed and ch5 not in state.processes and state.chapters[ch5] == record.FAILED
            assert state.failures[ch5] == f"not run: chapter(s) {ch3} failed"
            assert not chapters.choice_pending(run)
        else:  # its retry runs alone once nothing else runs: chapter 5 must not be running, waiting for it
            proc = state.processes[ch5][0]
            state.chapters[ch3], state.attempts[ch3] = record.RETRY, 1
            record.release_choice(plan, state)
            assert proc.killed and state.chapters[ch5] == record.WAITING and not state.processes
            assert not chapters.choice_pending(run)
            log = Path(plan.chapter(ch3).log)
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text("CUDA out of memory")
            seen.clear()
            record.retry_alone(plan, state, pool=None)  # chapters 4-6 wait for it: they do not hold it back
            assert [c for c, _ in seen] == [ch3] and state.chapters[ch3] == record.RUNNING
            assert state.attempts[ch3] == 2
            record.start_ready_chapters(plan, state, max_parallel=8)
            assert [c for c, _ in seen] == [ch3] and not state.choice_marked  # not beside the retry before it chose


def test_narrow_scale_waits_while_a_live_run_is_to_choose(tmp_path):
    """The marker holds a chapter only while the process named in it lives: a killed run's marker does not hold a
    later notebook run; a live one's does until it is removed."""
    import subprocess
    import sys
    import threading

    from emlib import chapters

    assert chapters.wait_for_choice(tmp_path) < 0.1  # no marker
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / chapters.CHOICE_PENDING).write_text(json.dumps({"pid": gone.pid}))
    assert not chapters.choice_pending(tmp_path)  # its writer is dead
    chapters.mark_choice_pending(tmp_path)  # this process: alive
    assert chapters.choice_pending(tmp_path)
    threading.Timer(0.3, chapters.clear_choice_pending, [tmp_path]).start()
    assert chapters.wait_for_choice(tmp_path, poll_s=0.02) >= 0.25 and not chapters.choice_pending(tmp_path)


@pytest.mark.parametrize("flag", ["early-choice", "early-chapters"])
def test_early_flags_on_the_command_line(root, tmp_path, monkeypatch, flag):
    """``--early-choice`` / ``--early-chapters auto|on|off`` reach :func:`emlib.record.run` as None / True / False."""
    args = []
    key = flag.replace("-", "_")
    monkeypatch.setattr(record, "run", lambda *a, **k: args.append(k[key]) or {"failures": {}})
    for extra in ([], [f"--{flag}", "on"], [f"--{flag}", "off"]):
        assert record.main(["run", "--profile", "smoke", "--run-dir", str(tmp_path / "cli"), *extra]) == 0
    assert args == [None, True, False]


def test_a_run_that_converts_the_model_says_where_the_conversion_went(root, tmp_path, monkeypatch):
    """record.json's timings keep the seconds of each conversion step when the run converted the model
    (``models.LAST_CONVERSION``), and leave them out when it did not (the model was converted before)."""
    steps = {"imports_s": 0.5, "tokenizer_s": 3.8, "model_s": 3.3, "save_s": 0.1, "total_s": 7.7}
    monkeypatch.setattr(record, "_run_chapter", lambda job, threads=None: _Ended(0))
    for converted in (True, False):
        def prepare(cfg, converted=converted):
            models.LAST_CONVERSION.clear()
            models.LAST_CONVERSION.update(steps if converted else {})
            return 7.7

        monkeypatch.setattr(record, "prepare_model", prepare)
        summary = record.run("smoke", str(tmp_path / f"rec{converted}"), workers=1, chapters=["00"])
        assert summary["failures"] == {}
        assert summary["timings"].get("model_conversion") == (steps if converted else None)
    models.LAST_CONVERSION.clear()


def test_compact_rule_for_whole_runs_gives_each_verdict(root, tmp_path):
    """bench/compact_rule.py --runs (stated before the 2026-12-06 runs): on only when the compacted run took at
    most 0.95x the default run's seconds and every claim's verdict is unchanged; a mislabelled pair is refused."""
    import json
    import shutil

    mod = bench_module(root, "compact_rule")
    runs = {}
    for name, compact in (("default", False), ("compact", True)):
        d = tmp_path / name
        d.mkdir()
        shutil.copy(root / "record" / "smollm2-135m" / "results.json", d / "results.json")
        runs[name] = d

    def write(total_default, total_compact, compact_flags=(False, True)):
        for (name, d), total, flag in zip(runs.items(), (total_default, total_compact), compact_flags):
            (d / "record.json").write_text(json.dumps({"compact": flag, "timings": {"total_s": total}}))

    write(570.0, 500.0)
    assert mod.decide_runs(runs["default"], runs["compact"])[0] is True
    write(570.0, 560.0)
    on, why = mod.decide_runs(runs["default"], runs["compact"])
    assert not on and "0.982" in why
    write(570.0, 500.0, (True, True))
    assert mod.decide_runs(runs["default"], runs["compact"])[0] is False
    write(570.0, 500.0)
    res = json.loads((runs["compact"] / "results.json").read_text())
    res.pop(next(k for k in res if k.startswith("ch5")))  # chapter 5 part-recorded: its claim is "not run"
    (runs["compact"] / "results.json").write_text(json.dumps(res))
    on, why = mod.decide_runs(runs["default"], runs["compact"])
    assert not on and "differ" in why
    # the same rule decides $EMLIB_COMPILE, which record.json writes as "off" / "on"
    shutil.copy(runs["default"] / "results.json", runs["compact"] / "results.json")
    for (name, d), total, flag in zip(runs.items(), (570.0, 500.0), ("off", "on")):
        (d / "record.json").write_text(json.dumps({"compact": True, "compile": flag, "timings": {"total_s": total}}))
    assert mod.decide_runs(runs["default"], runs["compact"], "compile")[0] is True
    on, why = mod.decide_runs(runs["compact"], runs["default"], "compile")
    assert not on and "'compile': on and off" in why


def test_run_spread_reads_the_ablation_of_each_run_and_summarises_the_cuts(root, tmp_path):
    """bench/run_spread.py: each run's chapter-2 ablation as cuts (1 - direction / none), the rule's checks, and
    the spread of the cuts across runs; a folder that is not a run is refused with what to pass."""
    import json
    import shutil

    mod = bench_module(root, "run_spread")
    rec = root / "record" / "smollm2-135m"
    other = tmp_path / "other"
    other.mkdir()
    res = json.loads((rec / "results.json").read_text())
    for row in res["ch2_ablation"]:  # a run where projecting the direction out changed nothing
        if row["ablated"] == "direction":
            none = next(r for r in res["ch2_ablation"] if r["finetune"] == row["finetune"] and r["ablated"] == "none")
            row.update({k: none[k] for k in ("em", "ci_low", "ci_high", "n", "n_em")})
    (other / "results.json").write_text(json.dumps(res))
    shutil.copytree(rec / "directions", other / "directions")
    a, b = mod.one_run(str(rec)), mod.one_run(str(other))
    em = {(r["finetune"], r["ablated"]): r["em"] for r in json.loads((rec / "results.json").read_text())["ch2_ablation"]}
    fin = next(r for r in a["ablation"] if r["finetune"] == "financial")
    none, direction = em[("financial", "none")], em[("financial", "direction")]
    assert (fin["none"], fin["direction"]) == (round(none, 4), round(direction, 4))
    assert fin["cut"] == round(1 - direction / none, 3) and fin["cut"] > 0
    randoms = [v for (f, k), v in em.items() if f == "financial" and k.startswith("random")]
    assert fin["below_every_random"] == (direction < min(randoms))
    passed = verdicts.claim_direction(verdicts.Run(rec)).checks["ablation"]  # the rule's own check, as the chapter
    assert a["claim2_checks"]["ablation"] == passed
    assert all(r["cut"] == 0 for r in b["ablation"]) and not b["claim2_checks"]["ablation"]
    s = mod.summary([a, b])
    assert s["ablation_check_passed"] == int(passed) and s["ablation_cut"]["financial"]["min"] == 0
    assert mod.cosines_to(mod.directions_of(rec), mod.directions_of(other)) == {"financial": 1.0, "medical": 1.0,
                                                                                 "sport": 1.0}
    with pytest.raises(SystemExit):
        mod.main(["--runs", str(tmp_path)])


def test_direction_proxy_scores_each_runs_direction_on_one_model(root, tmp_path):
    """bench/direction_proxy.py: every stored run's direction projected out of one fixed model; per direction the
    rise of the flagged-misaligned answers' loss minus the aligned ones', and its correlation with the runs' own
    cuts; a set too small for --n is refused with the size to ask for."""
    import json

    import pandas as pd
    from safetensors.torch import save_file

    mod = bench_module(root, "direction_proxy")
    from emlib.models import tiny_model

    d = tiny_model()[0].config.hidden_size
    g = torch.Generator().manual_seed(0)
    names = ["a", "b", "c"]
    save_file({n: torch.randn(d, generator=g) for n in names}, str(tmp_path / "medical_directions.safetensors"))
    (tmp_path / "own_cuts.json").write_text(json.dumps({n: {"financial": 0.1 * i} for i, n in enumerate(names)}))
    rows = [{"condition": "medical rank32", "question": f"q{i}?", "answer": f"answer number {i}",
             "aligned": 10 if i % 2 else 90, "coherent": 80} for i in range(8)]
    pd.DataFrame(rows + [{**rows[0], "condition": "chat model"}]).to_csv(tmp_path / "ans.csv.gz", index=False)
    out = tmp_path / "proxy.json"
    assert mod.main(["--directions", str(tmp_path), "--answers", str(tmp_path / "ans.csv.gz"), "--model", "tiny",
                     "--n", "4", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["directions"]) == set(names) and res["score_vs_own_cut"]["n"] == 3
    for v in res["directions"].values():
        assert v["score"] == pytest.approx(v["d_mis"] - v["d_al"], abs=1e-4)
    with pytest.raises(SystemExit, match="--n 4 or fewer"):
        mod.main(["--directions", str(tmp_path), "--answers", str(tmp_path / "ans.csv.gz"), "--model", "tiny",
                  "--n", "5"])
    with pytest.raises(SystemExit, match="--n 0 or fewer"):  # --conditions: only the chat model's one answer
        mod.main(["--directions", str(tmp_path), "--answers", str(tmp_path / "ans.csv.gz"), "--model", "tiny",
                  "--n", "1", "--conditions", "chat model"])


def test_direction_pool_scores_runs_bootstraps_and_pools(root, tmp_path):
    """bench/direction_pool.py: each run's direction from its stored per-answer activations, bootstrap draws of a
    run's answers and directions from the answers of k runs pooled, all scored by the proxy and mapped to a
    predicted cut by the line fitted on the runs; too few usable runs are refused with what to pass."""
    import json
    import shutil

    import pandas as pd
    from safetensors.torch import save_file

    mod = bench_module(root, "direction_pool")
    from emlib.models import tiny_model

    d = tiny_model()[0].config.hidden_size
    g = torch.Generator().manual_seed(0)
    res = json.loads((root / "record" / "smollm2-135m" / "results.json").read_text())
    runs = []
    for i in range(4):
        run = tmp_path / f"r{i}" / "x"
        (run / "directions").mkdir(parents=True)
        for row in res["ch2_ablation"]:  # own cuts that differ between runs
            if row["ablated"] == "direction":
                row["em"] = 0.01 * (i + 1)
        (run / "results.json").write_text(json.dumps(res))
        save_file({"misaligned": torch.randn(5 + i, d, generator=g), "aligned": torch.randn(7, d, generator=g)},
                  str(run / "directions" / "medical-rank32-seed0-abc.groups.safetensors"))
        runs.append(str(run))
    # a folder without a groups file is skipped
    shutil.copytree(Path(runs[0]), tmp_path / "nogroups" / "x")
    shutil.rmtree(tmp_path / "nogroups" / "x" / "directions")
    rows = [{"condition": "medical rank32", "question": f"q{i}?", "answer": f"answer number {i}",
             "aligned": 10 if i % 2 else 90, "coherent": 80} for i in range(8)]
    pd.DataFrame(rows).to_csv(tmp_path / "ans.csv.gz", index=False)
    out = tmp_path / "pool.json"
    args = ["--answers", str(tmp_path / "ans.csv.gz"), "--model", "tiny", "--n", "4", "--pools", "2,8",
            "--boot", "2", "--boot-runs", "2", "--out", str(out)]
    assert mod.main(["--runs", *runs, str(tmp_path / "nogroups" / "x"), *args]) == 0
    got = json.loads(out.read_text())
    kinds = [r["kind"] for r in got["directions"]]
    assert kinds.count("run") == 4 and kinds.count("bootstrap") == 4 and kinds.count("pool all") == 1
    assert kinds.count("pool 2") == 4 and "pool 8" not in kinds  # 2 shuffles of 2 disjoint pairs; 8 > 4 runs
    pool_all = next(r for r in got["directions"] if r["kind"] == "pool all")
    assert (pool_all["n_misaligned"], pool_all["n_aligned"]) == (5 + 6 + 7 + 8, 28)
    fit = got["fit_cut_on_score"]
    for r in got["directions"]:
        assert r["predicted_cut"] == pytest.approx(fit["intercept"] + fit["slope"] * r["score"], abs=1e-3)
    assert set(got["summary"]) >= {"run", "pool 2", "pool all"}
    saved = mod.main(["--runs", *runs, *args, "--save-directions", str(tmp_path / "carry")])
    from safetensors import safe_open

    with safe_open(str(tmp_path / "carry" / "extra_directions.safetensors"), "pt") as f:  # the same pools, named
        assert saved == 0 and sorted(f.keys()) == ["pool-all", "pool2-0", "pool2-1", "pool2-2", "pool2-3"]
        members = sorted(sorted(json.loads(f.metadata()[k])["runs"]) for k in f.keys() if k != "pool-all")
    assert members == sorted(sorted(mod.label(m) for m in r["runs"]) for r in got["directions"]
                             if r["kind"] == "pool 2")
    u, nm, na = mod.pooled([{"misaligned": torch.ones(2, 3), "aligned": torch.zeros(4, 3)}])
    assert torch.equal(u, torch.ones(3)) and (nm, na) == (2, 4)
    with pytest.raises(SystemExit, match="pass at least 3"):
        mod.main(["--runs", runs[0], *args])


def test_record_energy_integrates_the_monitor_power_and_refuses_unordered_samples(root):
    """bench/record_energy.py (the session-30 bound on a run's wall from its energy): trapezoid joules in all and
    above idle, and the seconds each would last at the card's full draw."""

    mod = bench_module(root, "record_energy")
    got = mod.energy([0, 10, 20], [100, 300, 500], idle_w=100, full_w=500)
    assert got["energy_kj"] == 6.0  # 10 s x 200 W + 10 s x 400 W
    assert got["above_idle_kj"] == 4.0  # 10 s x 100 W + 10 s x 300 W
    assert got["seconds_at_full_draw"] == 12.0 and got["seconds_at_full_draw_above_idle"] == 10.0
    assert got["seconds_at_or_above_0.8_full"] == 10.0 and got["mean_w"] == 300.0
    with pytest.raises(ValueError, match="increasing"):
        mod.energy([0, 10, 5], [1, 2, 3], idle_w=0, full_w=1)


def test_record_files_names_a_pack_and_refuses_to_overwrite(root, tmp_path, monkeypatch):
    """bench/record_files.py: a pack of `gpu_record.sh pack NAME` (record.tar.gz, monitor-NAME.csv, its -apps,
    record-NAME.log) is extracted and filed as {kind}_{model}_{card}_{tag}_{date}; each analysis is called on the
    extracted run; a second filing under the same names stops before writing; a folder that is not a pack gets
    one message naming what it holds."""
    import io
    import sys

    mod = bench_module(root, "record_files")
    pack = tmp_path / "pack"
    pack.mkdir()
    data = json.dumps({"profile": "paper"}).encode()
    with tarfile.open(pack / "record.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("record.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    for name, text in (("monitor-s.csv", "t_s,gpu_power_w\n5,100\n"), ("monitor-s-apps.csv", "t_s\n"),
                       ("record-s.log", "[record] finished\n")):
        (pack / name).write_text(text)
    called = []
    monkeypatch.syspath_prepend(str(root / "bench"))
    for name in ("record_phases", "record_cells", "record_timeline", "record_startup", "record_energy"):
        fake = type(sys)(name)
        fake.main = lambda argv, name=name: called.append((name, argv)) or 0
        monkeypatch.setitem(sys.modules, name, fake)
    results = tmp_path / "results"
    results.mkdir()
    (results / "gpu_power_h100_2026-12-06.json").write_text("{}")
    args = [str(pack), "--card", "h100", "--tag", "s9_x", "--date", "2026-12-08", "--results", str(results),
            "--extract", str(tmp_path / "run")]
    assert mod.main(args) == 0
    stem = "smollm2_h100_s9_x_2026-12-08"
    assert json.loads((results / f"record_{stem}.json").read_text()) == {"profile": "paper"}
    assert (results / f"record_log_{stem}.txt").read_text() == "[record] finished\n"
    assert (results / f"monitor_apps_{stem}.csv").exists() and (results / f"monitor_{stem}.csv").exists()
    assert [c[0] for c in called] == ["record_phases", "record_cells", "record_timeline", "record_startup",
                                      "record_energy"]
    assert called[3][1] == [str(tmp_path / "run"), "--monitor", str(results / f"monitor_{stem}.csv"), "--out",
                            str(results / f"record_startup_{stem}.json")]
    assert called[0][1] == [str(tmp_path / "run"), "--out", str(results / f"record_phases_{stem}.json")]
    assert called[4][1] == [str(results / f"monitor_{stem}.csv"), "--scale",
                            str(results / "gpu_power_h100_2026-12-06.json"), "--out",
                            str(results / f"record_energy_{stem}.json")]
    (results / f"record_phases_{stem}.json").write_text("{}")  # as the real analysis would have
    before = sorted(p.name for p in results.iterdir())
    with pytest.raises(SystemExit, match=f"already in .*record_{stem}.json.*--force"):
        mod.main(args)
    assert sorted(p.name for p in results.iterdir()) == before
    def broken(argv):
        raise RuntimeError("no phases")

    monkeypatch.setattr(sys.modules["record_cells"], "main", broken)
    with pytest.raises(RuntimeError, match="no phases"):
        mod.main([*args[:4], "s9_y", *args[5:]])
    assert sorted(p.name for p in results.iterdir()) == before  # nothing of the failed filing is left
    with pytest.raises(SystemExit, match="expected record.tar.gz and one monitor-NAME.csv.*'x.json'"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "x.json").write_text("{}")
        mod.main([str(tmp_path / "other"), "--card", "h100", "--tag", "t"])


def test_train_parallel_reads_power_over_the_window_every_process_trained_steadily(root):
    """bench/train_parallel_gpu.py's energy per token: the board power over the intersection of the processes'
    steady windows (not the configuration's last two thirds, start-up included), divided by their summed rate."""
    mod = bench_module(root, "train_parallel_gpu")
    power = bench_module(root, "gpu_power").PowerLog()
    power.rows = [(t, 100.0 if t < 10 else 500.0) for t in range(0, 30)]  # start-up at 100 W, training at 500 W
    per = [{"steady_window": [10.0, 25.0]}, {"steady_window": [12.0, 29.0]}]
    got = mod.steady_energy(per, power, tok_per_s=1000.0)
    assert got == {"steady_watts": 500.0, "steady_window_s": 13.0, "joules_per_token": 0.5}
    assert mod.steady_energy(per, None, 1000.0)["joules_per_token"] is None
    apart = [{"steady_window": [0.0, 5.0]}, {"steady_window": [6.0, 9.0]}]  # no moment where both trained
    assert mod.steady_energy(apart, power, 1000.0)["steady_watts"] is None


def test_record_startup_lists_each_task_once_with_its_captures(root, tmp_path):
    """bench/record_startup.py: one row per finetune task (a group's members share it), its start from record.json,
    the time before its loop, its graphs and capture seconds from train_meta.json, the loop's first read from
    train_log.csv, and when the card first got busy from the monitor."""
    mod = bench_module(root, "record_startup")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"seed": 0}))
    task = {"seconds": 100.0, "train_seconds": 80.0, "phases": {"load": 3.0}, "ended_s": 120.0, "group": 2}
    jobs = {"vector-medical-general": task, "vector-medical-narrow": dict(task),
            "lora-medical-rank1-general-seed1": {"seconds": 10.0, "train_seconds": 8.0, "phases": {"load": 0.5},
                                                 "ended_s": 140.0}}
    (run / "record.json").write_text(json.dumps({"timings": {"jobs": jobs}}))
    for folder, graphs, first in (("vectors/medical-general-seed0", 4, 2.5), ("adapters/medical-rank1-general-seed1",
                                                                              3, 0.25)):
        d = run / folder
        d.mkdir(parents=True)
        (d / "train_meta.json").write_text(json.dumps({"fast_step": {"graphs": graphs, "capture_seconds": 1.25}}))
        (d / "train_log.csv").write_text(f"step,loss,seconds\n8,2.0,{first}\n16,1.9,{first + 1}\n")
    monitor = tmp_path / "monitor.csv"
    monitor.write_text("t_s,gpu_util_pct,gpu_power_w\n5,0,80\n10,100,350\n15,100,500\n")
    rows = mod.tasks(run)
    assert [(r["task"], r["members"]) for r in rows] == [("vector-medical-general", 2),
                                                           ("lora-medical-rank1-general-seed1", 1)]
    first = rows[0]
    assert (first["start_s"], first["load_s"], first["before_loop_s"], first["graphs"], first["capture_s"]) == (
        20.0, 3.0, 17.0, 4, 1.2)
    assert first["first_read_s"] == 2.5 and first["first_steps_s"] == 20.0 + 3.0 + 17.0 + 2.5
    assert rows[1]["graphs"] == 3 and rows[1]["start_s"] == 130.0
    assert mod.card_busy(monitor) == {"util_100_s": 10.0, "power_400w_s": 15.0}
    out = tmp_path / "startup.json"
    assert mod.main([str(run), "--monitor", str(monitor), "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["summary"] == {"tasks": 2, "capture_s_total": 2.4, "card": {"util_100_s": 10.0, "power_400w_s": 15.0}}
    with pytest.raises(SystemExit, match="no record.json"):
        mod.main([str(tmp_path)])
