"""The shell scripts that carry a run to the lent GPU machine (scripts/gpu_carry.sh): what they do to a
checkout, run in a throw-away git repository."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _sh(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/gpu_carry.sh", *args], cwd=repo, capture_output=True, text=True)


@pytest.fixture()
def repo(tmp_path):
    """A git repository with the script, a committed record/ of 3 MiB (a run's tables; its config.json and
    results.json are small) and a carry folder of 30 MiB."""
    if shutil.which("git") is None:
        pytest.skip("needs git")
    r = tmp_path / "checkout"
    (r / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "gpu_carry.sh", r / "scripts")
    (r / "record" / "m" / "tables").mkdir(parents=True)
    (r / "record" / "m" / "tables" / "answers.csv").write_bytes(b"x" * 3 * 2**20)
    (r / "record" / "m" / "results.json").write_text('{"ch3_lambda_sweep": []}')
    (r / "record" / "m" / "config.json").write_text('{"profile": "paper"}')
    (r / ".gitignore").write_text(".carry-*\n")
    (r / ".carry-a").mkdir()
    (r / ".carry-a" / "part").write_bytes(b"y" * 30 * 2**20)
    for cmd in (["init", "-q"], ["add", "-A"],
                ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "start"]):
        subprocess.run(["git", *cmd], cwd=r, check=True)
    return r


def test_record_goes_aside_for_the_carry_and_comes_back(repo):
    """``aside`` moves record/ out of the checkout (the plan then counts a smaller working tree) but for each
    run's config.json and results.json (what ``record run --speculate record`` reads on the GPU), refuses to do
    it twice, and ``back`` restores it exactly as committed."""
    before = _sh(repo, "plan").stdout
    assert "the working tree is 3.0 MiB" in before and "aside" not in before
    out = _sh(repo, "aside")
    assert out.returncode == 0 and (repo.parent / "record-aside").is_dir()
    left = sorted(str(p.relative_to(repo)) for p in (repo / "record").rglob("*") if p.is_file())
    assert left == ["record/m/config.json", "record/m/results.json"]
    plan = _sh(repo, "plan").stdout
    assert "the working tree is 0.0 MiB" in plan and "record/ is aside" in plan
    again = _sh(repo, "aside")
    assert again.returncode != 0 and "record-aside exists" in again.stdout
    back = _sh(repo, "back")
    assert back.returncode == 0 and "as committed" in back.stdout
    assert (repo / "record" / "m" / "tables" / "answers.csv").stat().st_size == 3 * 2**20
    assert subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout == ""


def test_record_with_uncommitted_changes_stays(repo):
    (repo / "record" / "m" / "results.json").write_text("changed")
    out = _sh(repo, "aside")
    assert out.returncode != 0 and "uncommitted changes" in out.stdout and (repo / "record").is_dir()


def test_back_without_the_aside_folder_restores_from_git(repo):
    shutil.rmtree(repo / "record")
    out = _sh(repo, "back")
    assert out.returncode == 0 and (repo / "record" / "m" / "results.json").exists()


def test_the_plan_leaves_the_qwen_parts_out_unless_asked(repo):
    """A SmolLM2 run needs none of the second model's parts: ``plan`` leaves ``.carry-qwenN`` out (nine calls
    of ~53 MiB more), ``plan qwen`` counts them in."""
    (repo / ".carry-qwen1").mkdir()
    (repo / ".carry-qwen1" / "qwen-part-00").write_bytes(b"q" * 20 * 2**20)
    plain, qwen = _sh(repo, "plan").stdout, _sh(repo, "plan", "qwen").stdout
    assert ".carry-a" in plain and ".carry-qwen1" not in plain and "1 calls" in plain
    assert ".carry-a" in qwen and ".carry-qwen1" in qwen


def test_bytecode_compiles_what_lacks_it_once(tmp_path):
    """scripts/bytecode.py: the source files of a folder without up-to-date bytecode are counted and compiled, even
    with PYTHONDONTWRITEBYTECODE set (which only stops imports from writing it); a second call finds none; a file
    that does not compile is counted, not compiled, and stops nothing; a missing folder is named and skipped."""
    import importlib.util
    import os
    import sys

    pkg = tmp_path / "site" / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "sub" / "b.py").write_text("y = 2\n")
    (pkg / "broken.py").write_text("def (:\n")
    run = lambda *dirs: subprocess.run([sys.executable, str(ROOT / "scripts" / "bytecode.py"), *map(str, dirs)],
                                       capture_output=True, text=True, check=True,
                                       env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}).stdout
    first = run(tmp_path / "site", tmp_path / "nowhere")
    assert "3 of 3 source files had none, 2 compiled" in first and "most in pkg 3" in first
    assert "nowhere is not a folder, skipped" in first
    for f in (pkg / "a.py", pkg / "sub" / "b.py"):
        assert Path(importlib.util.cache_from_source(str(f))).exists()
    assert "1 of 3 source files had none, 0 compiled" in run(tmp_path / "site")  # only the broken one
