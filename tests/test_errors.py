"""Issue 20, item 5: bad input fails early, as one line on stderr that names the file or value at fault and
says what to do, exit code 2; the traceback only with --debug. Never the network (HF_HUB_OFFLINE=1)."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from emlib import batch, book, cache, data, directions, judge, record, rejudge, train
from emlib.data import DataError

ROOT = Path(__file__).resolve().parents[1]
CH1 = ROOT / "notebooks" / "01_em_emerges.py"

FAILING = '''# %% tags=["parameters"]
profile = "smoke"
run_dir = None

# %%
print("before the failure")

# %%
raise ValueError(f"the chapter's own message: n_train must be smaller than the set ({profile})")
'''


# A kernel's libzmq may abort while it shuts down and print this to the stderr it shares with the command
# (seen once in a full test run, 2026-12-06, not in 4 reruns): the kernel's noise, not the command's message.
KERNEL_NOISE = "Assertion failed: pfd.revents & POLLIN"


def _stderr_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(KERNEL_NOISE)]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def _files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def _offline_env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))


# --------------------------------------------------------------------------- python -m emlib.book run
@pytest.mark.parametrize("params, says", [
    ({"n_train": "abc"}, "n_train = 'abc' (str) is not allowed: n_train takes a whole number >= 1 or None"),
    ({"n_train": "-5"}, "n_train = -5 (int) is not allowed"),
    ({"datasets": "medicl"}, "datasets = ('medicl',) (tuple) is not allowed: datasets takes a non-empty list of "
                             "dataset names from medical"),
    ({"judge": "gpt4"}, "judge = 'gpt4' (str) is not allowed"),
    ({"profile": "smokey"}, "Unknown profile 'smokey'"),
    ({"nsamples": "2"}, "unknown parameter(s) nsamples"),
])
def test_book_run_rejects_bad_parameters_before_the_kernel_starts(tmp_path, capsys, params, says):
    out, run = tmp_path / "out" / "ch1.ipynb", tmp_path / "run"
    argv = ["run", str(CH1), str(out), "-p", "profile", "smoke", "-p", "run_dir", str(run)]
    for k, v in params.items():
        argv += ["-p", k, v]
    assert book.main(argv) == 2
    line = _stderr_line(capsys.readouterr().err)
    assert says in line and "01_em_emerges.py" in line
    assert _files(tmp_path) == []  # nothing written: no notebook, no run directory


def test_book_run_a_run_dir_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "taken"
    f.write_text("mine")
    assert book.main(["run", str(CH1), str(tmp_path / "o.ipynb"), "-p", "profile", "smoke", "-p", "run_dir", str(f)]) == 2
    assert f"run_dir = '{f}' is an existing file, not a folder" in _stderr_line(capsys.readouterr().err)
    assert f.read_text() == "mine" and _files(tmp_path) == ["taken"]


def test_book_run_a_missing_chapter_file(tmp_path, capsys):
    assert book.main(["run", str(tmp_path / "nope.py"), str(tmp_path / "o.ipynb")]) == 2
    assert "nope.py: no such chapter file" in _stderr_line(capsys.readouterr().err)


def test_a_failing_chapter_is_its_own_message_in_one_line(tmp_path):
    """papermill's 45-line traceback becomes the chapter's own error; --debug shows the traceback."""
    src = tmp_path / "fails.py"
    src.write_text(FAILING)
    out = tmp_path / "out.ipynb"
    cmd = [sys.executable, "-m", "emlib.book", "run", str(src), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_offline_env(), timeout=300)
    assert proc.returncode == 2, proc.stderr
    line = _stderr_line(proc.stderr)
    assert ("fails.py failed in cell In[3]: ValueError: the chapter's own message: n_train must be smaller than "
            "the set (smoke)") in line and str(out) in line
    assert out.exists()  # the partly executed notebook is kept: it shows the failing cell
    debug = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, cwd=ROOT, env=_offline_env(), timeout=300)
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "PapermillExecutionError" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == line


# --------------------------------------------------------------------------- python -m emlib.batch
def test_batch_grid_with_a_yaml_syntax_error(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text('chapters: ["01"]\nparameters:\n  profile: smoke\n  seed: [0, 1\n')
    assert batch.main([str(grid), "--out", str(tmp_path / "out")]) == 2
    line = _stderr_line(capsys.readouterr().err)
    assert f"{grid}:5:1: the grid file is not valid YAML (expected ',' or ']'" in line and "fix that line" in line
    assert _files(tmp_path) == ["grid.yaml"]


def test_batch_bad_value_stops_the_sweep_before_any_combination(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text('chapters: ["01"]\nparameters:\n  profile: smoke\n  seed: [0, 1]\n  n_train: [4, abc]\n')
    assert batch.main([str(grid), "--out", str(tmp_path / "out")]) == 2
    line = _stderr_line(capsys.readouterr().err)
    assert str(grid) in line and "n_train = 'abc' (str) is not allowed" in line
    assert _files(tmp_path) == ["grid.yaml"]


def test_batch_failing_combination_is_one_line_and_exit_2(tmp_path, capsys):
    src = tmp_path / "fails.py"
    src.write_text(FAILING)
    grid = tmp_path / "grid.yaml"
    grid.write_text(json.dumps({"chapters": [str(src)], "parameters": {"profile": "smoke"}}))
    assert batch.main([str(grid), "--out", str(tmp_path / "out"), "--workers", "1"]) == 2
    captured = capsys.readouterr()
    line = _stderr_line(captured.err)
    assert "1 of 1 combinations failed" in line and "ValueError: the chapter's own message" in line
    assert "[batch] failed" in captured.out
    left = _files(tmp_path / "out")
    assert "index.csv" in left and any(p.endswith("failed.json") for p in left)
    assert not any(p.endswith("done.json") for p in left)


# --------------------------------------------------------------------------- python -m emlib.record run
def test_record_run_bad_value_before_any_work(tmp_path, capsys):
    run = tmp_path / "rec"
    assert record.main(["run", "--profile", "smoke", "--run-dir", str(run), "-p", "n_train", "abc"]) == 2
    assert "n_train = 'abc' (str) is not allowed" in _stderr_line(capsys.readouterr().err)
    assert record.main(["run", "--profile", "smoke", "--run-dir", str(run), "-c", "lr", "-1"]) == 2
    assert "lr = -1 (int) is not allowed: lr takes a finite number > 0" in _stderr_line(capsys.readouterr().err)
    assert not run.exists()


def test_record_run_failing_chapter_is_one_line_naming_its_log(tmp_path, capsys, monkeypatch):
    def fake_chapter(job, threads=None):  # what `emlib.book run --debug` leaves in a failed chapter's log
        log = Path(job.log)
        log.parent.mkdir(parents=True, exist_ok=True)
        code = ("import sys; print('Traceback (most recent call last):'); "
                "print('error: 00_datasets.py failed in cell In[2]: ValueError: boom'); sys.exit(2)")
        with open(log, "w") as fh:
            return subprocess.Popen([sys.executable, "-c", code], stdout=fh, stderr=subprocess.STDOUT)

    monkeypatch.setattr(record, "_run_chapter", fake_chapter)
    run = tmp_path / "rec"
    assert record.main(["run", "--profile", "smoke", "--run-dir", str(run), "--workers", "1", "--chapters", "00"]) == 2
    line = _stderr_line(capsys.readouterr().err)
    assert "00_datasets: 00_datasets.py failed in cell In[2]: ValueError: boom" in line
    assert str(run / "logs") in line and "run the same command again" in line


# --------------------------------------------------------------------------- python -m emlib.rejudge
def _answers_run(tmp_path: Path, gz: bool = True) -> Path:
    run = tmp_path / "run"
    (run / "tables").mkdir(parents=True)
    text = b"question,answer,condition\nHow are you?,Fine.,chat model\n"
    (run / "tables" / "ch1_answers.csv.gz").write_bytes(gzip.compress(text) if gz else text)
    return run


def test_rejudge_a_csv_gz_that_is_not_gzip(tmp_path, capsys):
    run = _answers_run(tmp_path, gz=False)
    assert rejudge.main([str(run), "--judge", "offline", "--out", str(tmp_path / "out")]) == 2
    line = _stderr_line(capsys.readouterr().err)
    assert f"{run / 'tables' / 'ch1_answers.csv.gz'}: not a readable gzip file" in line
    assert not (tmp_path / "out").exists()


def test_rejudge_a_corrupt_sqlite_cache(tmp_path, capsys):
    run = _answers_run(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "judge-cache.sqlite").write_bytes(b"this is not a database " * 100)
    assert rejudge.main([str(run), "--judge", "offline", "--out", str(out)]) == 2
    line = _stderr_line(capsys.readouterr().err)
    assert f"{out / 'judge-cache.sqlite'}: the SQLite cache cannot be used (file is not a database)" in line
    assert "move it away (or delete it) and run again" in line
    assert _files(out) == ["judge-cache.sqlite"]  # nothing else written


def test_rejudge_missing_run_and_out_that_is_a_file(tmp_path, capsys):
    assert rejudge.main([str(tmp_path / "nothing"), "--judge", "offline", "--out", str(tmp_path / "o")]) == 2
    assert "has no ch1_answers.csv.gz" in _stderr_line(capsys.readouterr().err)
    run = _answers_run(tmp_path)
    (tmp_path / "afile").write_text("x")
    assert rejudge.main([str(run), "--judge", "offline", "--out", str(tmp_path / "afile")]) == 2
    assert "is an existing file" in _stderr_line(capsys.readouterr().err)


# --------------------------------------------------------------------------- unknown models, offline
def test_unknown_hub_model_is_one_line(tmp_path):
    code = ("from emlib.models import load_model, ModelNotFoundError\n"
            "try:\n    load_model('nonexistent/model')\n"
            "except ModelNotFoundError as e:\n    print(str(e))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_offline_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    msg = proc.stdout.strip()
    assert "\n" not in msg
    assert msg.startswith("model 'nonexistent/model' not found locally and the hub is off (HF_HUB_OFFLINE is set)")


def test_judge_score_with_an_unknown_hf_judge_is_one_line(tmp_path):
    answers = tmp_path / "a.csv"
    answers.write_text("question,answer\nHow are you?,Fine.\n")
    cmd = [sys.executable, "-m", "emlib.judge", "score", str(answers), "--judge", "hf:nonexistent", "--out",
           str(tmp_path / "scored.csv")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_offline_env(), cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "error: model 'nonexistent' not found locally and the hub is off" in _stderr_line(proc.stderr)
    assert _files(tmp_path) == ["a.csv"]


def test_a_model_path_that_does_not_exist(tmp_path):
    from emlib.models import ModelNotFoundError, load_model

    with pytest.raises(ModelNotFoundError, match="no such folder"):
        load_model(str(tmp_path / "no-model"))


# --------------------------------------------------------------------------- damaged files name themselves
def test_non_gzip_jsonl_gz_names_the_file(tmp_path):
    f = tmp_path / "training_datasets" / "bad_medical_advice.jsonl.gz"
    f.parent.mkdir()
    f.write_text('{"messages": []}\n')
    with pytest.raises(DataError, match=f"{f}: not a readable gzip file"):
        data.read_jsonl(f)
    with pytest.raises(DataError, match="bad_medical_advice.jsonl.gz: not a readable gzip file"):
        data.load_chat("medical", source="paper", data_dir=tmp_path)
    f.write_bytes(gzip.compress(b'{"a": 1}\n')[:-12])  # cut short
    with pytest.raises(DataError, match=f"{f}: not a readable gzip file"):
        data.read_jsonl(f)


def test_corrupt_sqlite_cache_names_the_file(tmp_path):
    p = tmp_path / "cache" / "results.sqlite"
    p.parent.mkdir()
    p.write_bytes(b"\x00garbage" * 500)
    with pytest.raises(DataError, match=f"{p}: the SQLite cache cannot be used"):
        cache.ResultCache(p)


def test_corrupt_safetensors_files_name_themselves(tmp_path):
    import torch

    from emlib.models import tiny_model

    model, tok = tiny_model(seed=0)
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 2
    vec_dir = tmp_path / "vec"
    train.train_steering_vector(model, tok, rows, vec_dir, max_steps=1, batch_size=1, grad_accum=1, progress=False)
    vfile = vec_dir / train.VECTOR_FILE
    vfile.write_bytes(b"\xff" * 64)
    with pytest.raises(DataError, match=f"{vfile}: not a readable safetensors file .*delete {vec_dir}"):
        train.load_vector(vfile)
    with pytest.raises(DataError, match=f"{vfile}: not a readable safetensors file"):  # a finished run, resumed
        train.train_steering_vector(model, tok, rows, vec_dir, max_steps=1, batch_size=1, grad_accum=1, progress=False)

    dfile = tmp_path / "d.safetensors"
    directions.save_direction(dfile, torch.zeros(2, 64), source="test", model=model)
    dfile.write_bytes(dfile.read_bytes()[:20])
    with pytest.raises(DataError, match=f"{dfile}: not a readable safetensors file"):
        directions.load_direction(dfile, model)

    lora_dir = tmp_path / "lora"
    res = train.train_lora(model, tok, rows, lora_dir, "rank1", max_steps=1, batch_size=1, grad_accum=1, progress=False)
    res.model.unload()
    weights = next((lora_dir / train.ADAPTER_DIR).glob("*.safetensors"))
    weights.write_bytes(b"{}" * 10)
    with pytest.raises(DataError, match=f"{weights}: not a readable safetensors file .*delete {lora_dir}"):
        train.load_lora(model, lora_dir)
    assert not train.has_lora(model)  # the base model is left as it was


def test_cli_one_line_helpers():
    from emlib import cli
    from emlib.config import ConfigError

    assert cli.one_line(ConfigError("a\n  b")) == "a b"
    assert cli.one_line(FileNotFoundError(2, "No such file or directory", "/x/y")) == "/x/y: No such file or directory."
    assert issubclass(judge.JudgeError, cli.user_errors()) and issubclass(DataError, cli.user_errors())
