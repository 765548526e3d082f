"""benchmarks/digits/bench.py: the plan / cache logic (fast) and the quick profile end to end (slow)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "digits" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("digits_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["digits_bench"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_plan_covers_every_row_and_is_deterministic(bench):
    for name, profile in bench.PROFILES.items():
        plan = bench.build_plan(profile)
        again = bench.build_plan(profile)
        assert list(plan.jobs) == list(again.jobs), name  # keys depend only on settings
        assert {r.group for r in plan.rows} == set(range(1, 10)), name  # the rows 1-8 and the shipped model
        types = {j.spec["type"] for j in plan.jobs.values()}
        assert {"eval", "finetune", "train_base", "real_floor", "seed_floor"} <= types
        for job in plan.jobs.values():
            assert all(d in plan.jobs for d in job.deps)
            assert job.est_s > 0
    full = bench.build_plan(bench.PROFILES["full"])
    assert all(j.spec["n"] == 2000 and j.spec["seed"] == 123 for j in full.jobs.values() if j.spec["type"] == "eval")
    # the full plan fits its stated budget on 2 workers (90 minutes before row 6 grew to three seeds x three chains)
    assert bench.simulate(full, list(full.jobs), 2) <= bench.BUDGET_MIN * 60
    # shared settings share a job: the headline fine-tune serves rows 3, 4, 6 and 7
    head = [k for k, j in full.jobs.items() if j.spec["type"] == "finetune" and j.spec["steps"] == 1000]
    assert any({3, 4, 6, 7} <= full.jobs[k].rows for k in head)


def test_job_keys_follow_settings(bench):
    a = {"type": "eval", "model": {"source": "x"}, "nfe": 1}
    assert bench.job_key(a) == bench.job_key(dict(reversed(list(a.items()))))
    assert bench.job_key(a) != bench.job_key({**a, "nfe": 2})
    assert bench.spec_deps({"init": {"job": "abc"}, "x": [{"job": "def"}]}) == ["abc", "def"]


def test_select_only_rows(bench):
    plan = bench.build_plan(bench.PROFILES["quick"])
    keys = bench.select(plan, "1")
    # row 1 is the base alone, plus the floors that need no fine-tune
    assert {plan.jobs[k].spec["type"] for k in keys} == {"eval", "real_floor", "seed_floor"}
    assert all(1 in plan.jobs[k].rows or plan.jobs[k].rows == {0} for k in keys)
    head_floor = [k for k, j in plan.jobs.items() if j.spec["type"] == "seed_floor" and j.deps]
    assert head_floor and head_floor[0] not in keys
    assert head_floor[0] in bench.select(plan, "1", cached=set(plan.jobs[head_floor[0]].deps))
    assert head_floor[0] in bench.select(plan, "8")  # row 8 fine-tunes the headline seed itself
    assert set(bench.select(plan, "")) == set(plan.jobs)
    with pytest.raises(SystemExit):
        bench.select(plan, "10")


def test_execute_caches_and_resumes(bench, tmp_path, monkeypatch):
    """Jobs run once in dependency order; a second execute finds everything cached."""
    plan = bench.Plan(bench.PROFILES["quick"])
    a = plan.add({"type": "fake", "v": 1}, 1.0)
    b = plan.add({"type": "fake", "v": 2, "up": {"job": a}}, 1.0)
    calls = []

    def fake_run(spec, work):
        calls.append(spec["v"])
        return {"v": spec["v"], "wall_s": 0.0}

    monkeypatch.setattr(bench, "run_job", fake_run)
    records, ran, failed = bench.execute(plan, [b], tmp_path, workers=1, log=lambda m: None)
    assert ran == 2 and calls == [1, 2] and records[b]["result"]["v"] == 2
    assert json.loads((tmp_path / "jobs" / f"{b}.json").read_text())["spec"]["up"] == {"job": a}
    records, ran, failed = bench.execute(plan, [b], tmp_path, workers=1, log=lambda m: None)
    assert ran == 0 and calls == [1, 2]
    (tmp_path / "jobs" / f"{b}.json").unlink()  # an interrupted run: only the missing job is redone
    records, ran, failed = bench.execute(plan, [b], tmp_path, workers=1, log=lambda m: None)
    assert ran == 1 and calls == [1, 2, 2] and not failed


def test_execute_keeps_going_after_a_failure(bench, tmp_path, monkeypatch):
    plan = bench.Plan(bench.PROFILES["quick"])
    bad = plan.add({"type": "fake", "v": 0}, 5.0)
    down = plan.add({"type": "fake", "v": 1, "up": {"job": bad}}, 1.0)
    other = plan.add({"type": "fake", "v": 2}, 1.0)

    def fake_run(spec, work):
        if spec["v"] == 0:
            raise ValueError("boom")
        return {"v": spec["v"], "wall_s": 0.0}

    monkeypatch.setattr(bench, "run_job", fake_run)
    records, ran, failed = bench.execute(plan, [down, other], tmp_path, workers=1, log=lambda m: None)
    assert ran == 1 and other in records and set(failed) == {bad, down}
    assert "boom" in failed[bad] and "upstream" in failed[down]
    assert not (tmp_path / "jobs" / f"{bad}.json").exists()  # retried next time


def test_ship_and_out_dir_refuse_what_the_bench_did_not_write(bench, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    args = ["--profile", "quick", "--work", str(tmp_path / "work"), "--out-dir", str(tmp_path / "o"), "--workers", "1"]
    with pytest.raises(SystemExit) as e:
        bench.main(args + ["--ship", str(mine)])
    assert e.value.code == 2 and "--ship" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep me" and not (tmp_path / "work").exists()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "RESULTS.md").write_text("my own results")
    with pytest.raises(SystemExit) as e:
        bench.main(args[:-4] + ["--out-dir", str(theirs)])
    assert e.value.code == 2 and "--out-dir" in capsys.readouterr().err
    assert (theirs / "RESULTS.md").read_text() == "my own results" and not (tmp_path / "work").exists()


@pytest.mark.e2e
@pytest.mark.slow
def test_quick_profile_end_to_end(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    args = ["--profile", "quick", "--work", str(tmp_path / "work"), "--out-dir", str(tmp_path), "--workers", "1"]
    res = bench.main(args + ["--ship", str(tmp_path / "ship")])
    assert res["meta"]["jobs_run"] > 0
    md = (tmp_path / "RESULTS.md").read_text()
    data = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "fd_vs_nfe.png").stat().st_size > 1000
    assert (tmp_path / "ship" / "config.json").exists()
    assert {r["row"] for r in data["rows"]} == set(range(1, 10))
    for r in data["rows"]:
        assert r["fd"] is not None and r["command"].startswith("fm.sample(")
        assert r["samples"] == 200 and r["eval_wall_s"] is not None and r["train_wall_s"] is not None
    assert {"real_halves", "seed_base", "seed_headline"} <= set(data["noise_floors"])
    for g in range(1, 10):
        assert f"## {g}. " in md
    assert md.count("Noise floors: base at") >= 8  # every comparison section states the floors
    assert re.search(
        r"Best 1-step model of the run: .* = \*\*[0-9.]+x\*\* the base's best FD .* acceptance <= 1.1x", md
    )
    assert re.search(r"Best 2-step model of the run: .* acceptance <= 1.0x: \*\*(PASS|FAIL)\*\*", md)
    assert re.search(r"Shipped builtin:digits-dmf at 1 NFE: .* acceptance <= 1.1x: \*\*(PASS|FAIL)\*\*", md)
    assert json.loads((tmp_path / "ship" / "config.json").read_text())["conditioning"] == "decoupled"
    again = bench.main(args)
    assert again["meta"]["jobs_run"] == 0  # everything cached
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == data["rows"]


@pytest.mark.e2e
@pytest.mark.slow
def test_interrupted_finetune_resumes_from_its_checkpoint(bench, tmp_path):
    """A fine-tune job whose process died after a checkpoint continues from it and ends where a clean run ends."""
    import flowmap_convert as fm

    spec = {
        "type": "finetune",
        "init": {"source": bench.BASE, "depth": 5},
        "objective": "dmf",
        "train": "all",
        "depth": 5,
        "steps": 3,
        "batch_size": 4,
        "lr": 2e-4,
        "mg_scale": 0.0,
        "derivative": "jvp",
        "loss": "adaptive",
        "seed": 11,
        "checkpoint_every": 1,
    }
    clean = bench.run_job(spec, str(tmp_path / "a"))
    out = tmp_path / "b" / "models" / bench.job_key(spec)
    kw = {k: spec[k] for k in ("objective", "train", "steps", "batch_size", "lr", "mg_scale", "derivative", "loss")}
    fm.finetune(
        fm.convert(bench.BASE, depth=5), **{**kw, "steps": 2}, seed=11, depth=5, out=str(out), device="cpu", grid=False
    )  # stands in for a run killed after step 2 (its checkpoint stays)
    resumed = bench.run_job(spec, str(tmp_path / "b"))
    assert resumed["resumed"] and not clean["resumed"]
    a = fm.load(clean["path"]).state_dict()
    b = fm.load(resumed["path"]).state_dict()
    assert all(bool((a[k] == b[k]).all()) for k in a)


def test_compare_matches_rows_by_job_and_uses_the_seed_floor(tmp_path):
    spec = importlib.util.spec_from_file_location("digits_compare", BENCH.parent / "compare.py")
    cmp_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cmp_mod)

    def row(job, fd, train):
        return {"row": 3, "setting": job, "nfe": 1, "sampler": "euler", "fd": fd, "train_wall_s": train, "job": job}

    floors = {"seed_base": {"to_real": [2.7, 2.4]}, "seed_headline": {"to_real": [2.2, 2.3]}}
    old = {"meta": {}, "rows": [row("a", 5.0, 0.0), row("b", 2.0, 10.0), row("c", 2.0, 10.0)]}
    new = {
        "meta": {"wall_s": 60},
        "noise_floors": floors,
        "rows": [row("a", 5.2, 0.0), row("b", 2.0, 10.0), row("c", 2.5, 10.0), row("d", 1.0, 10.0)],
    }
    out = cmp_mod.compare(old, new)
    by = {r["setting"]: r for r in out["rows"]}
    assert set(by) == {"a", "b", "c"} and out["unmatched_new_rows"] == 1
    assert by["a"]["within"] and abs(by["a"]["floor"] - 0.3) < 1e-9  # untrained: the base's spread
    assert by["b"]["within"] and by["b"]["diff"] == 0.0
    assert not by["c"]["within"] and abs(by["c"]["floor"] - 0.1) < 1e-9  # trained: the headline's spread
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(new))
    assert cmp_mod.main([str(tmp_path / "old.json"), str(tmp_path / "new.json"), "--out", str(tmp_path / "r.md")]) == 1
    assert "| 3 | c | 1 | euler | 2.000 | 2.500 | +0.500 | 0.10 | NO |" in (tmp_path / "r.md").read_text()
