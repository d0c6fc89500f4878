"""The one runner (emlib.runner): chapter selection, parameters folded into `config` and checked before any
kernel starts, a job executed by papermill (its wall time, a failure as fields and as one line)."""
import json
import os
from pathlib import Path

import nbformat
import pytest

from emlib import runner
from emlib.cli import ChapterFailed
from emlib.config import ConfigError

CHAPTER = '''# %% tags=["parameters"]
profile = "auto"
config = {}
interactive = True

# %%
import json
with open(config["run_dir"] + ".seen.json", "w") as fh:
    json.dump({"profile": profile, "config": config, "interactive": interactive}, fh)

# %%
if config.get("seed") == 13:
    raise ValueError(f"unlucky seed {config['seed']}")
'''


@pytest.fixture()
def chapter(tmp_path) -> Path:
    path = tmp_path / "07_synthetic.py"
    path.write_text(CHAPTER)
    return path


def test_chapters_are_selected_by_number_stem_or_path_with_one_error(root, chapter):
    every = runner.select(root=root)
    assert [p.name[:2] for p in every] == sorted(p.name[:2] for p in every) and len(every) >= 7
    first = every[1]  # 01_...
    assert runner.resolve("01", root=root) == runner.resolve(1, root=root) == runner.resolve(first.stem, root=root) \
        == first
    assert runner.select(["03", 1, "03", str(chapter)], root=root) == [every[3], first, chapter.resolve()]
    with pytest.raises(FileNotFoundError, match=r"No chapter '99' in .*the chapters are 00_datasets, 01_"):
        runner.resolve("99", root=root)
    with pytest.raises(FileNotFoundError, match="01_no_such_stem"):
        runner.resolve("01_no_such_stem", root=root)
    with pytest.raises(FileNotFoundError, match="nope.py: no such chapter file"):
        runner.resolve(str(chapter.parent / "nope.py"))


def test_config_fields_are_folded_into_config_and_checked_before_any_kernel(chapter, tmp_path):
    got = runner.chapter_parameters(chapter, {"profile": "smoke", "n_train": 4, "datasets": ("medical",),
                                              "run_dir": tmp_path / "run", "config": {"seed": 3, "n_train": 2}})
    assert got == {"profile": "smoke", "config": {"seed": 3, "n_train": 4, "datasets": ["medical"],
                                                  "run_dir": str(tmp_path / "run")}}  # top level wins over config
    assert runner.taken(runner.chapter_defaults(chapter), {"seed": 1, "a": 2}) == {"seed": 1, "interactive": False}
    with pytest.raises(ConfigError, match=r"07_synthetic.py: unknown parameter\(s\) nsamples; this chapter takes "
                                          r"config, interactive, profile, and inside config any of"):
        runner.chapter_parameters(chapter, {"nsamples": 2})
    with pytest.raises(ConfigError, match=r"unknown config field\(s\) n_tran in config"):
        runner.chapter_parameters(chapter, {"config": {"n_tran": 2}})
    with pytest.raises(ConfigError, match="07_synthetic.py: n_train = 'abc' .* is not allowed"):
        runner.chapter_parameters(chapter, {"profile": "smoke", "n_train": "abc"})
    with pytest.raises(ConfigError, match="07_synthetic.py: .*Unknown profile 'smokey'"):
        runner.chapter_parameters(chapter, {"profile": "smokey"})
    with pytest.raises(ConfigError, match="kl_lamda are taken by none of the chapters"):
        runner.parameters_for({chapter: runner.chapter_defaults(chapter)}, {"kl_lamda": 1})
    jobs = runner.chapter_jobs([chapter], {"profile": "smoke", "seed": 2}, tmp_path / "run", tmp_path, logs=True)
    assert jobs == [runner.Job(source=str(chapter), cwd=str(tmp_path), notebook=str(tmp_path / "run" / "executed" /
                                                                                    "07_synthetic.ipynb"),
                               parameters={"profile": "smoke", "interactive": False,
                                           "config": {"seed": 2, "run_dir": str(tmp_path / "run")}},
                               log=str(tmp_path / "run" / "logs" / "07_synthetic.log"))]
    assert not (tmp_path / "run").exists()  # planning writes nothing


def test_run_job_passes_config_to_the_kernel_and_reports_a_failure_in_one_line(chapter, tmp_path):
    (ok,) = runner.chapter_jobs([chapter], {"profile": "smoke", "seed": 1, "n_train": 4}, tmp_path / "a", tmp_path)
    row = runner.run_job(ok)
    assert row["status"] == "ok" and row["wall_s"] > 0 and row["error"] is None
    seen = json.loads((tmp_path / "a.seen.json").read_text())
    assert seen == {"profile": "smoke", "config": {"seed": 1, "n_train": 4, "run_dir": str(tmp_path / "a")},
                    "interactive": False}
    assert Path(ok.notebook).exists()

    (bad,) = runner.chapter_jobs([chapter], {"profile": "smoke", "seed": 13}, tmp_path / "b", tmp_path)
    row = runner.run_job(bad)
    assert row["status"] == "failed" and row["error"] == "ValueError: unlucky seed 13"
    cell = [c for c in nbformat.read(bad.notebook, as_version=4).cells if c.get("execution_count") == row["error_cell"]]
    assert len(cell) == 1 and cell[0].source.startswith("if config.get")
    with pytest.raises(ChapterFailed) as err:
        runner.run_job(bad, raise_failure=True)
    msg = str(err.value)
    assert msg.startswith(f"07_synthetic.py failed in cell In[{row['error_cell']}]: ValueError: unlucky seed 13 "
                          f"(the executed notebook {bad.notebook} shows the cell")
    assert "\n" not in msg and type(err.value.__cause__).__name__ == "PapermillExecutionError"


def test_book_build_is_a_thin_caller_of_the_runner(tmp_path, capsys):
    """`emlib.book build` on a one-chapter book: the chapter gets profile, config (with the run directory and
    -p's fields) and interactive=False, its notebook lands in RUN_DIR/executed/, the book renders, and the
    wall times are saved; a failing chapter stops the build with one line."""
    from emlib import book

    root = tmp_path / "book_root"
    (root / "notebooks").mkdir(parents=True)
    (root / "book").mkdir()
    (root / "_config.yml").write_text('title: "t"\nonly_build_toc_files: true\nexecute:\n  execute_notebooks: "off"\n')
    (root / "_toc.yml").write_text("format: jb-book\nroot: book/intro\nchapters:\n  - file: notebooks/01_synthetic\n")
    (root / "book" / "intro.md").write_text("# Intro\n\nA one-chapter book.\n")
    (root / "notebooks" / "01_synthetic.py").write_text("# %% [markdown]\n# # A chapter\n\n" + CHAPTER)
    run = tmp_path / "run"
    summary = book.build("smoke", str(run), root=root, extra={"n_train": 4})
    seen = json.loads((tmp_path / "run.seen.json").read_text())
    assert seen == {"profile": "smoke", "config": {"n_train": 4, "run_dir": str(run)}, "interactive": False}
    assert (run / "executed" / "01_synthetic.ipynb").exists() and Path(summary["index"]).exists()
    saved = json.loads((run / "book_build.json").read_text())
    assert set(saved["seconds"]) == {"01_synthetic", "render"} and saved["seconds"]["01_synthetic"] > 0
    with pytest.raises(ChapterFailed, match=r"01_synthetic.py failed in cell In\[\d+\]: ValueError: unlucky seed 13"):
        book.build("smoke", str(run), root=root, chapters=["01"], extra={"seed": 13})
    with pytest.raises(FileNotFoundError, match="No chapter '02'"):
        book.build("smoke", str(run), root=root, chapters=["02"])


# --------------------------------------------------------------------------- MPS
def _fake_mps(tmp_path, start_rc: int = 0):
    """A stand-in ``nvidia-cuda-mps-control`` on PATH that logs its arguments, stdin and pipe folder."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "calls.log"
    exe = bindir / runner.MPS_CONTROL
    exe.write_text(f"#!/bin/sh\necho \"args=$* pipe=$CUDA_MPS_PIPE_DIRECTORY stdin=$(cat -)\" >> {log}\n"
                   f"[ \"$1\" = -d ] && exit {start_rc}\nexit 0\n")
    exe.chmod(0o755)
    return bindir, log


def test_mps_daemon_starts_exports_and_quits(tmp_path, monkeypatch):
    bindir, log = _fake_mps(tmp_path)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    with runner.mps_daemon() as status:
        assert status == "on"
        pipe = os.environ["CUDA_MPS_PIPE_DIRECTORY"]  # children inherit it
        assert os.path.isdir(pipe) and os.path.isdir(os.environ["CUDA_MPS_LOG_DIRECTORY"])
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ and not os.path.exists(pipe)
    calls = log.read_text().splitlines()
    assert calls[0].startswith(f"args=-d pipe={pipe}") and calls[1] == f"args= pipe={pipe} stdin=quit"


def test_mps_daemon_off_says_why(tmp_path, monkeypatch):
    bindir, _ = _fake_mps(tmp_path, start_rc=3)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    with runner.mps_daemon() as status:
        assert status.startswith("off (the daemon did not start") and "CUDA_MPS_PIPE_DIRECTORY" not in os.environ
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with runner.mps_daemon() as status:
        assert status == f"off ({runner.MPS_CONTROL} is not on PATH)"
    with runner.mps_daemon(False) as status:
        assert status == "off (not asked for)"


def test_environ_sets_names_for_a_block_and_restores_each(monkeypatch):
    monkeypatch.setenv("EMLIB_TEST_A", "before")
    monkeypatch.delenv("EMLIB_TEST_B", raising=False)
    with pytest.raises(RuntimeError):
        with runner.environ({"EMLIB_TEST_A": "1", "EMLIB_TEST_B": "2"}):
            assert os.environ["EMLIB_TEST_A"] == "1" and os.environ["EMLIB_TEST_B"] == "2"
            raise RuntimeError("the block failed")
    assert os.environ["EMLIB_TEST_A"] == "before" and "EMLIB_TEST_B" not in os.environ


def test_started_workers_are_warmed_before_their_first_job(tmp_path):
    """``start_workers`` spawns every worker of a pool at once (a spawn pool would start one per job), and each
    runs ``warm`` before any job: the run of record warms its finetune workers while it converts the model."""
    import functools
    import os

    from emlib import record

    flag = tmp_path / "warmed"
    pool = runner.process_pool(2, warm=functools.partial(os.makedirs, str(flag), exist_ok=True))
    try:
        runner.start_workers(pool, 2)
        assert len(pool._processes) == 2  # both spawned before any real job was submitted
        assert pool.submit(os.path.isdir, str(flag)).result(timeout=120)
    finally:
        pool.shutdown(wait=True)
    record.warm_worker()  # its imports exist; without a GPU it touches no device
