import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from emlib.cache import ResultCache, adapter_hash, make_key, model_fingerprint
from emlib.models import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def test_put_get_first_write_wins(tmp_path):
    c = ResultCache(tmp_path / "r.sqlite")
    assert c.put_many("answers", {"k1": {"a": 1}, "k2": {"a": "ü"}}) == 2
    assert c.put_many("answers", {"k1": {"a": 99}, "k3": [1, 2]}) == 1  # k1 is never overwritten
    assert c.get_many("answers", ["k1", "k2", "k3", "nope"]) == {"k1": {"a": 1}, "k2": {"a": "ü"}, "k3": [1, 2]}
    assert c.count("answers") == 3 and c.get("scores", "k1") is None
    assert set(c.frame("answers")["key"]) == {"k1", "k2", "k3"}
    assert c.integrity_ok()
    with pytest.raises(ValueError, match="Bad cache table name"):
        c.get_many("drop table x;", ["k"])
    c.close()
    assert ResultCache(tmp_path).path.name == "results.sqlite"  # a directory gets a default file
    con = sqlite3.connect(tmp_path / "r.sqlite")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_make_key_is_order_independent_and_complete():
    k = make_key(model="m", prompt="p", seed=0, temperature=1.0)
    assert k == make_key(temperature=1.0, seed=0, prompt="p", model="m")
    assert k != make_key(model="m", prompt="p", seed=1, temperature=1.0)
    assert k != make_key(model="m", prompt="p ", seed=0, temperature=1.0)
    assert len(k) == 64


def test_fingerprint_tracks_weights_and_adapters():
    from peft import LoraConfig, get_peft_model

    m, _ = tiny_model(seed=0)
    fp0 = model_fingerprint(m)
    assert fp0 == model_fingerprint(tiny_model(seed=0)[0]) != model_fingerprint(tiny_model(seed=1)[0])
    assert adapter_hash(m) is None
    with torch.no_grad():
        m.model.layers[0].mlp.down_proj.weight[0, 0] += 1e-3  # an in-place change (merge, finetune)
    assert model_fingerprint(m) != fp0
    cfg = LoraConfig(r=2, target_modules=["down_proj"], init_lora_weights=False)
    p1 = get_peft_model(tiny_model(seed=0)[0], cfg)
    h1 = adapter_hash(p1)
    with torch.no_grad():
        next(v for k, v in p1.named_parameters() if "lora_B" in k).add_(1.0)
    assert h1 is not None and adapter_hash(p1) != h1


WRITER = textwrap.dedent("""
    import sys
    from emlib.cache import ResultCache
    c = ResultCache(sys.argv[1])
    b = 0
    while True:
        c.put_many("rows", {f"{b}:{i}": {"batch": b, "i": i, "pad": "x" * 200} for i in range(50)})
        b += 1
""")


def _kill_when(proc, cond, limit=120.0):
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the writer exited early:\n{proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() - t0 > limit:
            proc.kill()
            raise AssertionError("the writer made no progress")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _count(db, table):
    try:
        con = sqlite3.connect(db, timeout=30)
        return con.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    except sqlite3.OperationalError:  # file or table not created yet
        return 0


def test_sigkill_mid_write_loses_no_committed_batch(tmp_path):
    db = tmp_path / "kill.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db)], cwd=ROOT, stderr=subprocess.PIPE)
    _kill_when(proc, lambda: _count(db, "rows") >= 2000)
    c = ResultCache(db)
    assert c.integrity_ok()
    df = c.frame("rows")
    assert len(df) >= 2000 and not df["key"].duplicated().any()
    per_batch = df.groupby("batch")["i"].nunique()
    assert (per_batch == 50).all()  # every batch is all there or absent
    assert sorted(per_batch.index) == list(range(len(per_batch)))  # and none is missing in between


SAMPLER_RUN = textwrap.dedent("""
    import sys, time
    import pandas as pd
    from emlib.generate import hf_sampler, sample_answers
    from emlib.models import tiny_model

    def slow(model, tok, prompts, seeds, params):
        time.sleep(0.05)
        return hf_sampler(model, tok, prompts, seeds, params)
    slow.sampler_id = hf_sampler.sampler_id

    m, tok = tiny_model(seed=0)
    q = pd.DataFrame({"id": [f"q{i}" for i in range(10)], "question": [f"Question number {i}?" for i in range(10)]})
    sample_answers(m, tok, q, 8, max_new_tokens=5, batch_size=2, seed=7, cache=sys.argv[1], sampler=slow,
                   progress=False)
""")


def test_sampling_resumes_after_sigkill(tmp_path):
    from emlib.generate import hf_sampler, sample_answers

    db = tmp_path / "answers.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", SAMPLER_RUN, str(db)], cwd=ROOT, stderr=subprocess.PIPE)
    _kill_when(proc, lambda: _count(db, "answers") >= 10)
    cache = ResultCache(db)
    assert cache.integrity_ok()
    before = cache.frame("answers")
    assert 10 <= len(before) < 80 and not before["key"].duplicated().any()

    generated = []

    def counting(model, tok, prompts, seeds, params):
        generated.extend(prompts)
        return hf_sampler(model, tok, prompts, seeds, params)
    counting.sampler_id = hf_sampler.sampler_id

    m, tok = tiny_model(seed=0)
    q = pd.DataFrame({"id": [f"q{i}" for i in range(10)], "question": [f"Question number {i}?" for i in range(10)]})
    # resuming with another batch size is fine: keys do not depend on it
    df = sample_answers(m, tok, q, 8, max_new_tokens=5, batch_size=16, seed=7, cache=cache, sampler=counting,
                        progress=False)
    assert len(df) == 80 and len(generated) == 80 - len(before)  # only the missing answers were made
    assert cache.count("answers") == 80
    after = cache.frame("answers").set_index("key")
    kept = after.loc[before["key"], "answer"].tolist()
    assert kept == before["answer"].tolist()  # rows written before the kill are unchanged
    got = df.set_index(["question_id", "sample"])["answer"]
    for _, r in before.iterrows():
        assert got[(r["question_id"], r["sample"])] == r["answer"]
    generated.clear()
    sample_answers(m, tok, q, 8, max_new_tokens=5, batch_size=16, seed=7, cache=cache, sampler=counting,
                   progress=False)
    assert generated == []


def test_many_processes_open_a_new_cache_at_once(tmp_path):
    """Workers of a run open its (new) cache together; none may fail with "database is locked"."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Manager() as m, ctx.Pool(8) as pool:
        barrier = m.Barrier(8)
        for attempt in range(8):  # each round: a fresh file, 8 processes released by one barrier
            path = str(tmp_path / f"c{attempt}.sqlite")
            got = pool.map(_open_and_write, [(path, i, barrier) for i in range(8)], chunksize=1)
            assert got == list(range(8))


def _open_and_write(arg):
    from emlib.cache import ResultCache

    path, i, barrier = arg
    barrier.wait()
    c = ResultCache(path)
    c.put_many("t", {f"k{i}": i})
    return c.get_many("t", [f"k{i}"])[f"k{i}"]


KEYS_IN_A_PROCESS = textwrap.dedent("""
    import json
    import torch
    from peft import LoraConfig, get_peft_model
    from emlib.batch import job_key
    from emlib.cache import adapter_hash, make_key, model_fingerprint
    from emlib.models import tiny_model

    cfg = LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
                     init_lora_weights=False)
    torch.manual_seed(0)  # the random LoRA init: the same weights in every process
    m = get_peft_model(tiny_model(seed=0)[0], cfg)
    torch.manual_seed(0)
    one = get_peft_model(tiny_model(seed=0)[0], LoraConfig(r=2, target_modules=["down_proj"],
                                                           init_lora_weights=False))
    tags = {"medical", "financial", "sport", "general"}
    import emlib.cache as C
    new_default = getattr(C, "json_default", str)
    C.json_default = str  # the old serialisation: str() of a set
    legacy_one = adapter_hash(one)
    C.json_default = new_default
    print(json.dumps({"legacy_one_module": legacy_one, "adapter": adapter_hash(m), "fingerprint": model_fingerprint(m),
                      "set_key": make_key(kind="x", tags=tags, nested={"b": frozenset(tags), "a": 1}),
                      "job": job_key("ch1", {"datasets": tags}),
                      "one_module": adapter_hash(one), "plain": make_key(kind="x", a=[1, "b"], f=0.1)}))
""")


def test_cache_keys_are_the_same_in_every_process():
    """Keys built from sets (a peft config's target_modules) must not depend on PYTHONHASHSEED."""
    seen = []
    for seed in ("0", "1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        r = subprocess.run([sys.executable, "-c", KEYS_IN_A_PROCESS], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        seen.append(json.loads(r.stdout.strip().splitlines()[-1]))
    for name in seen[0]:
        assert len({s[name] for s in seen}) == 1, (name, [s[name] for s in seen])
    # keys that were already deterministic keep their old values (caches and records stay valid)
    assert seen[0]["plain"] == make_key(kind="x", a=[1, "b"], f=0.1)
    assert seen[0]["one_module"] == seen[0]["legacy_one_module"]  # a one-element set: as before
    assert seen[0]["plain"] == hashlib.sha256(b'{"a":[1,"b"],"f":0.1,"kind":"x"}').hexdigest()


def test_answers_asked_for_twice_at_once_are_sampled_once(tmp_path):
    """Two askers (threads here; chapter processes in a run of record) want overlapping answers from one cache
    at the same time: each samples only what nobody is sampling, then waits for the rest and reads it from the
    cache; both get the same answers for the same keys. A claim left by a process that has died is taken over."""
    import threading

    from emlib.cache import Claims
    from emlib.generate import hf_sampler, sample_answers

    m, tok = tiny_model(seed=0)
    q = pd.DataFrame({"id": [f"q{i}" for i in range(4)], "question": [f"Question number {i}?" for i in range(4)]})
    started, calls = threading.Event(), {"first": 0, "second": 0}

    def sampler_of(who, wait=0.0):
        def sampler(model, tok, prompts, seeds, params):
            calls[who] += len(prompts)
            started.set()
            time.sleep(wait)
            return hf_sampler(model, tok, prompts, seeds, params)
        sampler.sampler_id = hf_sampler.sampler_id
        return sampler

    out = {}

    def ask(who, n=3, wait=0.0, seed=7):
        out[who] = sample_answers(m, tok, q, n, max_new_tokens=4, batch_size=4, seed=seed, cache=tmp_path / "c",
                                  sampler=sampler_of(who, wait), progress=False)

    first = threading.Thread(target=ask, args=("first", 3, 0.3))
    first.start()
    assert started.wait(30)
    ask("second", n=4)  # samples 0-2 of each question are the first asker's: only sample 3 is sampled here
    first.join()
    assert calls == {"first": 12, "second": 4}
    shared = out["second"][out["second"]["sample"] < 3].reset_index(drop=True)
    pd.testing.assert_frame_equal(out["first"], shared)

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    keys = [f"k{i}" for i in range(3)]
    ghost = Claims(ResultCache(tmp_path / "c"))
    ghost.pid = int(dead.stdout)  # its claims now name a process that has ended
    assert ghost.claim(keys) == set(keys)
    reborn = Claims(ResultCache(tmp_path / "c"))
    reborn.started = "1"  # this process's number, another start time: a process that has ended
    assert reborn.claim(["k8"]) == {"k8"}
    other = Claims(ResultCache(tmp_path / "c"))
    assert other.claim(keys + ["k8", "k9"]) == set(keys + ["k8", "k9"])  # taken over, and the free one
    alive = Claims(ResultCache(tmp_path / "c"))
    assert alive.claim(keys) == set()  # held by a live process
    other.release()
    assert alive.claim(keys) == set(keys)
