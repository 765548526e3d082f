"""The digits benchmark in one command (`make bench-digits`): base, conversion, fine-tuning, from scratch, model
guidance, MF-RAE, samplers and seeds on `builtin:digits-sit`, with noise floors, in at most 2 hours on 2 CPU cores
(BUDGET_MIN; the estimate was 90 minutes before row 6 grew to MF-RAE chains over three seeds).

Every unit of work (a fine-tune, a base training, one evaluation set, a noise floor) is a *job* whose settings are
hashed into a key; its result is cached as JSON under the work dir (`<work>/jobs/<key>.json`, models under
`<work>/models/<key>/`), so an interrupted run resumes (fine-tunes continue from their last checkpoint) and a re-run
only redoes what changed. Jobs run on a pool of worker processes (one torch thread each), longest chain first.

    python benchmarks/digits/bench.py                       # the full plan (prints it first), writes RESULTS.md etc.
    python benchmarks/digits/bench.py --plan                # print the plan and the budget only
    python benchmarks/digits/bench.py --only 1,2            # run only rows 1 and 2 (cached rows still reported)
    python benchmarks/digits/bench.py --profile quick --work /tmp/b --out-dir /tmp/b   # tiny version of every row
    python benchmarks/digits/bench.py --ship out/digits-dmf # also export the best 1-step model there

Evaluation: `fm.sample(model, nfe=N, classes=list(range(10)), num_samples=2000, seed=123, batch_size=500)`
(classes cycled 0..9), digits FD = Fréchet distance of the builtin classifier's 64-d features to all 1797 real
digits (`flowmap_convert.digits.evaluate_digits`).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # evaluate_base.py / train_base.py live beside this file

BUDGET_MIN = 120  # the full plan's estimate on 2 workers stays below this (tests/test_bench_digits.py)
BASE = "builtin:digits-sit"
CTM_GAMMA = 0.3  # CTM re-noising strength of row 7 (gamma 0 would make CTM identical to Euler)
ROW_TITLES = {
    0: "Noise floors",
    1: "Base model (velocity, Euler), with and without CFG",
    2: "Conversion without training, every depth",
    3: "DMF fine-tuning: all parameters vs decoder only, and run length",
    4: "Conversion vs training from scratch",
    5: "Model guidance on an under-trained and on the converged base",
    6: "MF-RAE recipe (CMT, then MFD, MFT or MFD -> MFT) vs DMF at equal wall time, 3 seeds; JVP vs finite differences",
    7: "Samplers on the headline fine-tune (all parameters, best depth, headline length)",
    8: "Fine-tune seeds of the headline rows",
    9: "The shipped 1-step model, builtin:digits-dmf, in this run",
}
SHIPPED = "builtin:digits-dmf"

# Measured costs, one torch thread on the shared 2-core build machine. The DMF step is the reference (0.65 s at batch
# 32); the factors were measured with `fm.finetune(..., dry_run=True)` (6 steps each, batch 32, depth 5) all under the
# same load: decoder 0.58 (0.71 in FINETUNE.md), fd 1.07, mg 1.37 (1.35 in FINETUNE.md), cmt 1.94, mfd 0.96, mft 0.54;
# sampling 2000 digits cost 4.0 DMF steps per NFE under that load (2.6 s), classifier features + FD a few seconds.
# The plan's minutes come from these (rounded up).
COST = {
    "dmf_step_b32": 0.65,  # s per DMF step (JVP, all parameters) at batch 32
    "decoder_factor": 0.65,  # decoder-only step relative to all parameters
    "fd_factor": 1.07,  # finite-difference derivative relative to JVP
    "mg_factor": 1.37,  # model guidance adds a teacher forward pass
    "objective_factor": {"dmf": 1.0, "cmt": 1.0, "mfd": 1.33, "mft": 1.63, "fm": 0.4},  # MF-RAE: its recipe
    "base_step_b64": 0.65,  # s per base flow-matching step at batch 64 (train_base.py: 1.53 steps/s)
    "eval_nfe_2000": 3.0,  # s per NFE for 2000 samples
    "features_2000": 3.0,  # s of classifier features + FD for 2000 samples
    "job_overhead": 4.0,  # s to start a job (load model, export)
}


@dataclass(frozen=True)
class Profile:
    """Every size knob of a benchmark run."""

    name: str = "full"
    n: int = 2000  # samples per evaluation
    seed: int = 123  # sampling seed
    floor_seed: int = 124  # the second sampling seed of the seed-to-seed floor
    base_nfe: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    cfg: tuple[float, int] = (1.5, 8)  # (scale, NFE) of the guided base row
    floor_nfe: int = 8  # NFE of the base's seed-to-seed floor
    conv_depths: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    conv_nfe: tuple[int, ...] = (1, 2, 4, 8)
    ft_nfe: tuple[int, ...] = (1, 2, 4)
    batch: int = 32
    lr: float = 2e-4
    ft_seed: int = 11
    best_depth: int = 5  # the depth builtin:digits-sit carries (search-depth's pick); row 3 checks it after training
    sweep_depths: tuple[int, ...] = (4, 5)
    sweep_steps: int = 300
    lengths: tuple[int, ...] = (300, 1000, 3000)
    headline_steps: int = 1000  # the fine-tuning budget of rows 4 and 8
    base_steps: int = 1800  # the builtin base's training: steps at base_batch
    base_batch: int = 64
    under_steps: int = 300  # the under-trained base of row 5
    mg: float = 0.6
    mg_steps: int = 300
    deriv_steps: int = 300  # JVP vs FD
    # MF-RAE at DMF's headline wall (1000 DMF steps), measured side by side at one thread: a CMT step (4 trajectories
    # x 8 pairs) costs 1.0 DMF step, an MFD step 1.42 and an MFT step 1.74 (finite differences), so after CMT 150 the
    # 850 DMF steps left buy MFD 600, or MFT 490, or the paper's MFD -> MFT at its 2:1 ratio of iterations, 400 -> 160
    mfrae_cmt: int = 150
    mfrae_chains: tuple = ((("mfd", 600),), (("mft", 490),), (("mfd", 400), ("mft", 160)))
    mfrae_chain_seeds: tuple = (3, 3, 1)  # seeds per chain: MFD alone (the recipe) and MFT alone on all three
    seeds: tuple[int, ...] = (11, 12, 13)
    sampler_nfe: tuple[int, ...] = (1, 2, 4)
    checkpoint_every: int = 250
    batch_eval: int = 500


PROFILES = {
    "full": Profile(),
    "quick": Profile(  # a tiny version of every row type, for the test
        name="quick",
        n=200,
        base_nfe=(1, 2),
        cfg=(1.5, 1),
        floor_nfe=1,
        conv_depths=(4, 5),
        conv_nfe=(1,),
        ft_nfe=(1, 2),
        batch=8,
        sweep_depths=(5,),
        sweep_steps=2,
        lengths=(2, 3),
        headline_steps=3,
        base_steps=2,
        under_steps=3,
        mg_steps=2,
        deriv_steps=2,
        mfrae_cmt=1,
        mfrae_chains=((("mfd", 1),), (("mfd", 1), ("mft", 1))),
        mfrae_chain_seeds=(2, 1),
        seeds=(11, 12),
        sampler_nfe=(1,),
        checkpoint_every=0,
        batch_eval=200,
    ),
}


# ------------------------------------------------------------------------------------------------ plan
def job_key(spec: dict) -> str:
    """A job's cache key: the hash of its settings (upstream jobs enter through their keys)."""
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def spec_deps(obj) -> list[str]:
    """Keys of the jobs a spec refers to ({"job": key} anywhere inside it)."""
    out = []
    if isinstance(obj, dict):
        if "job" in obj:
            out.append(obj["job"])
        for v in obj.values():
            out += spec_deps(v)
    elif isinstance(obj, list):
        for v in obj:
            out += spec_deps(v)
    return out


@dataclass
class Job:
    key: str
    spec: dict
    est_s: float
    deps: list[str]
    rows: set[int] = field(default_factory=set)


@dataclass
class Row:
    group: int
    label: str  # the setting, e.g. "DMF all params, depth 5, 1000 steps"
    nfe: int
    eval_key: str
    model: dict  # the evaluated model's spec
    sampler: str = "euler"
    cfg: float = 1.0
    series: str = ""  # one line of the FD-vs-NFE plot


class Plan:
    """The job graph and the result rows of one profile."""

    def __init__(self, p: Profile):
        self.p = p
        self.jobs: dict[str, Job] = {}
        self.rows: list[Row] = []
        self._group = 0

    def add(self, spec: dict, est_s: float) -> str:
        key = job_key(spec)
        if key not in self.jobs:
            self.jobs[key] = Job(key, spec, est_s, spec_deps(spec))
        self._mark(key)
        return key

    def _mark(self, key: str) -> None:
        job = self.jobs[key]
        job.rows.add(self._group)
        for d in job.deps:
            self._mark(d)

    # -- estimates
    def eval_cost(self, nfe: int, cfg: float = 1.0, sampler: str = "euler") -> float:
        k = self.p.n / 2000
        evals = nfe * (2 if cfg != 1.0 else 1) * (1.3 if sampler != "euler" else 1.0)
        return COST["job_overhead"] + k * (evals * COST["eval_nfe_2000"] + COST["features_2000"])

    def ft_cost(self, steps: int, objective="dmf", train="all", mg=0.0, derivative="jvp") -> float:
        s = COST["dmf_step_b32"] * self.p.batch / 32 * COST["objective_factor"][objective]
        s *= COST["decoder_factor"] if train == "decoder" else 1.0
        s *= COST["mg_factor"] if mg > 0 else 1.0
        s *= COST["fd_factor"] if derivative == "fd" else 1.0
        return COST["job_overhead"] + steps * s

    # -- job builders
    def finetune(self, init: dict, steps: int, *, depth=None, objective="dmf", train="all", mg=0.0, seed=None, **kw):
        p = self.p
        spec = {
            "type": "finetune",
            "init": init,
            "objective": objective,
            "train": train,
            "depth": p.best_depth if depth is None else depth,
            "steps": steps,
            "batch_size": p.batch,
            "lr": p.lr,
            "mg_scale": mg,
            "derivative": kw.get("derivative", "jvp"),
            "loss": kw.get("loss", "adaptive"),
            "seed": p.ft_seed if seed is None else seed,
            "checkpoint_every": p.checkpoint_every,
        }
        spec.update(kw.get("extra", {}))  # further Recipe fields (row 6: the MF-RAE recipe of each stage)
        return self.add(spec, self.ft_cost(steps, objective, train, mg, spec["derivative"]))

    def evaluate(self, label: str, model: dict, nfe: int, *, sampler="euler", cfg=1.0, series=None, gamma=0.0) -> None:
        p = self.p
        spec = {"type": "eval", "model": model, "nfe": nfe, "sampler": sampler, "cfg_scale": cfg}
        if gamma:
            spec["gamma"] = gamma  # CTM re-noising (with gamma 0 CTM is the Euler flow-map sampler)
        spec.update({"n": p.n, "seed": p.seed, "batch_size": p.batch_eval})
        key = self.add(spec, self.eval_cost(nfe, cfg, sampler))
        self.rows.append(Row(self._group, label, nfe, key, model, sampler, cfg, series or label))

    def group(self, g: int) -> None:
        self._group = g


MFRAE_FIELDS = ("time_shift", "ema_warmup", "teacher", "cmt_pairs", "ema")


def mfrae_stage(objective: str, p: Profile) -> tuple[str, str, dict]:
    """(loss, derivative, other Recipe fields) of one MF-RAE stage on digits: the mf-rae recipes' values
    (flowmap_convert/finetuning/recipes.py) with the base as teacher, scaled to the bench's batch.

    CMT: plain MSE, 8 pairs per teacher trajectory (the 512 px value; 4 trajectories x 8 pairs keep the bench's 32
    rows per step), EMA 0.999. MFD / MFT: MF-RAE's loss w m^2, finite differences, EMA 0.9999. Every stage: the
    time shift from the latent shape (sqrt(1 x 16 x 16 / 4096) = 0.25), no guidance, EMA warm-up kept on (these runs
    are hundreds of steps, not the paper's 10^5), and the MFD / CMT teacher is the base flow model the chain
    started from, never the previous stage's own u(x, t, t).
    """
    common = {"time_shift": None, "ema_warmup": True, "teacher": BASE}
    if objective == "cmt":
        pairs = 8
        return "mse", "jvp", {**common, "cmt_pairs": pairs, "batch_size": max(1, p.batch // pairs), "ema": 0.999}
    return "mfrae", "fd", {**common, "ema": 0.9999}


def build_plan(p: Profile) -> Plan:
    """Every job and row of the benchmark for a profile (static: no job depends on another's numbers)."""
    plan = Plan(p)
    base = {"source": BASE}
    d = p.best_depth

    def ft_model(key: str) -> dict:
        return {"job": key}

    # 0: noise floors
    plan.group(0)
    plan.add({"type": "real_floor", "repeats": 5}, 10.0)
    plan.add(
        {"type": "seed_floor", "model": base, "nfe": p.floor_nfe, "seeds": [p.seed, p.floor_seed], "n": p.n},
        2 * plan.eval_cost(p.floor_nfe),
    )
    # 1: base
    plan.group(1)
    for nfe in p.base_nfe:
        plan.evaluate("base, Euler", base, nfe)
    plan.evaluate(f"base, Euler, CFG {p.cfg[0]}", base, p.cfg[1], cfg=p.cfg[0])
    # 2: conversion without training
    plan.group(2)
    for depth in p.conv_depths:
        for nfe in p.conv_nfe:
            plan.evaluate(f"converted depth {depth}, no training", {"source": BASE, "depth": depth}, nfe)
    # 3: fine-tuning: all vs decoder at several depths, then length at the best depth
    plan.group(3)
    conv = {"source": BASE, "depth": d}
    for depth in p.sweep_depths:
        for train in ("all", "decoder"):
            k = plan.finetune({"source": BASE, "depth": depth}, p.sweep_steps, depth=depth, train=train)
            for nfe in p.ft_nfe:
                plan.evaluate(f"DMF {train}, depth {depth}, {p.sweep_steps} steps", ft_model(k), nfe)
    for steps in p.lengths:
        k = plan.finetune(conv, steps)
        for nfe in p.ft_nfe:
            plan.evaluate(f"DMF all, depth {d}, {steps} steps", ft_model(k), nfe)
    headline = plan.finetune(conv, p.headline_steps)
    # 4: from scratch with the fine-tuning budget and with the total budget
    plan.group(4)
    # total budget at equal compute: the base's training wall (base_steps at base_batch) in DMF steps, plus fine-tuning
    total = round(p.base_steps * COST["base_step_b64"] / COST["dmf_step_b32"]) + p.headline_steps
    budgets = (
        (p.headline_steps, "fine-tuning budget"),
        (
            total,
            f"total budget: the base's {p.base_steps} steps at batch {p.base_batch} as DMF steps of equal wall, "
            f"+ {p.headline_steps}",
        ),
    )
    for steps, what in budgets:
        k = plan.finetune({"scratch": BASE, "depth": d, "init_seed": 0}, steps)
        for nfe in p.ft_nfe:
            plan.evaluate(f"DMF from scratch, depth {d}, {steps} steps ({what})", ft_model(k), nfe)
    for nfe in p.ft_nfe:
        plan.evaluate(f"DMF all, depth {d}, {p.headline_steps} steps (converted)", ft_model(headline), nfe)
    # 5: model guidance on an under-trained and the converged base
    plan.group(5)
    under = plan.add(
        {"type": "train_base", "steps": p.under_steps},
        COST["job_overhead"] + p.under_steps * COST["base_step_b64"],
    )
    for init_name, init in (
        (f"under-trained base ({p.under_steps} steps)", {"job": under, "depth": d}),
        ("converged base", conv),
    ):
        for mg in (0.0, p.mg):
            k = plan.finetune(init, p.mg_steps, mg=mg)
            for nfe in p.ft_nfe:
                plan.evaluate(f"DMF mg {mg}, {init_name}, depth {d}, {p.mg_steps} steps", ft_model(k), nfe)
    # 6: MF-RAE vs DMF at equal wall, three seeds: CMT, then MFD alone, MFT alone, or MFD -> MFT (each stage from the
    # previous export); the paper (Sec. 4.3, Tab. 2) finds MFD converging faster than MFT. Then JVP vs FD.
    plan.group(6)
    for seed in p.seeds:
        loss, derivative, extra = mfrae_stage("cmt", p)
        cmt = ft_model(
            plan.finetune(conv, p.mfrae_cmt, objective="cmt", loss=loss, derivative=derivative, extra=extra, seed=seed)
        )
        for chain, n_seeds in zip(p.mfrae_chains, p.mfrae_chain_seeds):
            if seed not in p.seeds[:n_seeds]:
                continue
            prev, label = cmt, f"MF-RAE cmt {p.mfrae_cmt}"
            for objective, steps in chain:
                loss, derivative, extra = mfrae_stage(objective, p)
                prev = ft_model(
                    plan.finetune(
                        prev, steps, objective=objective, loss=loss, derivative=derivative, extra=extra, seed=seed
                    )
                )
                label += f" -> {objective} {steps}"
            for nfe in p.ft_nfe:
                plan.evaluate(f"{label}, seed {seed}", prev, nfe, series=label if seed == p.seeds[0] else "")
        k = plan.finetune(conv, p.headline_steps, seed=seed)
        for nfe in p.ft_nfe:
            plan.evaluate(
                f"DMF all, depth {d}, {p.headline_steps} steps (converted), seed {seed}",
                ft_model(k),
                nfe,
                series=f"DMF all, depth {d}, {p.headline_steps} steps (converted)" if seed == p.seeds[0] else "",
            )
    for deriv in ("jvp", "fd"):
        k = plan.finetune(conv, p.deriv_steps, derivative=deriv)
        for nfe in p.ft_nfe:
            plan.evaluate(f"DMF all, depth {d}, {p.deriv_steps} steps, derivative {deriv}", ft_model(k), nfe)
    # 7: samplers on the headline model
    plan.group(7)
    for sampler, gamma in (("euler", 0.0), ("restart", 0.0), ("ctm", CTM_GAMMA)):
        for nfe in p.sampler_nfe:
            plan.evaluate(
                f"DMF all, depth {d}, {p.headline_steps} steps, sampler {sampler}"
                + (f" gamma {gamma}" if gamma else ""),
                ft_model(headline),
                nfe,
                sampler=sampler,
                gamma=gamma,
            )
    # 8: fine-tune seeds of the headline rows
    plan.group(8)
    for seed in p.seeds:
        k = plan.finetune(conv, p.headline_steps, seed=seed)
        for nfe in p.ft_nfe:
            plan.evaluate(
                f"DMF all, depth {d}, {p.headline_steps} steps, seed {seed}",
                ft_model(k),
                nfe,
                series=f"DMF seed {seed}",
            )
    # 9: the model the package ships, sampled in the same run as the base (the acceptance compares the two)
    plan.group(9)
    for nfe in p.ft_nfe:
        plan.evaluate(f"{SHIPPED} (shipped)", {"source": SHIPPED}, nfe)
    plan.group(0)
    plan.add(
        {"type": "seed_floor", "model": ft_model(headline), "nfe": 1, "seeds": [p.seed, p.floor_seed], "n": p.n},
        2 * plan.eval_cost(1),
    )
    return plan


def critical_tails(plan: Plan) -> dict[str, float]:
    """Estimated seconds from a job's start to the end of its longest chain of dependents."""
    children: dict[str, list[str]] = {k: [] for k in plan.jobs}
    for k, j in plan.jobs.items():
        for d in j.deps:
            children[d].append(k)
    memo: dict[str, float] = {}

    def tail(k: str) -> float:
        if k not in memo:
            memo[k] = plan.jobs[k].est_s + max((tail(c) for c in children[k]), default=0.0)
        return memo[k]

    return {k: tail(k) for k in plan.jobs}


def simulate(plan: Plan, keys: list[str], workers: int) -> float:
    """Estimated wall seconds of running `keys` on `workers` processes, longest chain first."""
    tails = critical_tails(plan)
    todo, done, running, now = set(keys), set(), [], 0.0
    while todo or running:
        ready = sorted(
            (k for k in todo if all(d in done or d not in keys for d in plan.jobs[k].deps)), key=lambda k: -tails[k]
        )
        while ready and len(running) < workers:
            k = ready.pop(0)
            todo.discard(k)
            running.append((now + plan.jobs[k].est_s, k))
        if not running:
            break
        running.sort()
        now, k = running.pop(0)
        done.add(k)
    return now


def describe_model(m: dict, plan: Plan) -> str:
    """A model spec as the public-API expression that builds it."""
    if "scratch" in m:
        return f"fm.FlowMap(fm.load({m['scratch']!r}).config).with_depth({m['depth']}) (fresh weights, torch seed {m['init_seed']})"
    if "job" in m:
        spec = plan.jobs[m["job"]].spec
        if spec["type"] == "train_base":
            inner = f"`python benchmarks/digits/train_base.py --steps {spec['steps']} --out BASE{spec['steps']}`"
            return f"fm.convert(BASE{spec['steps']}, depth={m['depth']}) after {inner}" if "depth" in m else inner
        return describe_finetune(spec, plan)
    if "depth" in m:
        return f"fm.convert({m['source']!r}, depth={m['depth']})"
    return f"fm.load({m['source']!r})"


def describe_finetune(spec: dict, plan: Plan) -> str:
    keys = ("objective", "train", "depth", "steps", "batch_size", "lr", "mg_scale", "derivative", "loss", "seed")
    args = ", ".join(f"{k}={spec[k]!r}" for k in keys)
    return f"fm.finetune({describe_model(spec['init'], plan)}, data='builtin:digits', {args})"


def row_command(row: Row, plan: Plan) -> str:
    p = plan.p
    extra = f", sampler={row.sampler!r}" if row.sampler != "euler" else ""
    extra += f", cfg_scale={row.cfg}" if row.cfg != 1.0 else ""
    extra += f", gamma={CTM_GAMMA}" if row.sampler == "ctm" else ""
    return (
        f"fm.sample({describe_model(row.model, plan)}, nfe={row.nfe}, classes=list(range(10)), num_samples={p.n}, "
        f"seed={p.seed}, batch_size={p.batch_eval}{extra})"
    )


def print_plan(plan: Plan, keys: list[str], cached: set[str], workers: int, out=sys.stdout) -> float:
    """The job table with estimated minutes; returns the estimated wall seconds of what is left."""
    print(f"plan ({plan.p.name} profile): {len(plan.jobs)} jobs, {len(plan.rows)} result rows", file=out)
    print(f"{'row':>5} {'jobs':>5} {'cached':>6} {'est. min (1 worker)':>20}", file=out)
    for g in sorted(ROW_TITLES):
        ks = [k for k in keys if g in plan.jobs[k].rows]
        if not ks:
            continue
        est = sum(plan.jobs[k].est_s for k in ks if k not in cached)
        print(f"{g:>5} {len(ks):>5} {sum(k in cached for k in ks):>6} {est / 60:>20.1f}  {ROW_TITLES[g]}", file=out)
    left = [k for k in keys if k not in cached]
    total = sum(plan.jobs[k].est_s for k in left)
    wall = simulate(plan, left, workers)
    print(
        f"to run: {len(left)} jobs, {total / 60:.1f} worker-min, about {wall / 60:.1f} min wall on {workers} "
        f"worker(s) (costs per unit: {json.dumps(COST)})",
        file=out,
        flush=True,
    )
    return wall


# ------------------------------------------------------------------------------------------------ jobs (workers)
def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def resolve_model(m: dict, work: Path):
    """Build the FlowMap a model spec names."""
    import torch

    import flowmap_convert as fm

    if "scratch" in m:
        torch.manual_seed(m["init_seed"])
        cfg = fm.load(m["scratch"]).config
        return fm.FlowMap(cfg.replace(provenance={}, training={})).with_depth(m["depth"])
    src = str(work / "models" / m["job"]) if "job" in m else m["source"]
    return fm.convert(src, depth=m["depth"]) if "depth" in m else fm.load(src)


def run_job(spec: dict, work: str) -> dict:
    """Run one job in this process (its log goes to <work>/logs/<key>.log); returns its result dict."""
    work = Path(work)
    key = job_key(spec)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with (
        open(work / "logs" / f"{key}.log", "a") as log,
        contextlib.redirect_stdout(log),
        contextlib.redirect_stderr(log),
    ):
        result = _run(spec, work, key, log)
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    return result


def _run(spec: dict, work: Path, key: str, log) -> dict:
    import numpy as np
    import torch

    import flowmap_convert as fm

    torch.set_num_threads(1)
    kind = spec["type"]
    if kind == "eval":
        from evaluate_base import sample_eval

        model = resolve_model(spec["model"], work)
        m, _, sec = _sample_eval(sample_eval, model, spec)
        return {**m, "sample_s": round(sec, 2)}
    if kind == "real_floor":
        from evaluate_base import real_halves_floor

        v = real_halves_floor(spec["repeats"])
        return {"values": v, "mean": float(np.mean(v)), "min": float(min(v)), "max": float(max(v))}
    if kind == "seed_floor":
        from evaluate_base import sample_eval

        from flowmap_convert.digits import digits_features
        from flowmap_convert.metrics import feature_stats, frechet_distance

        model = resolve_model(spec["model"], work)
        sets, fds = [], []
        for s in spec["seeds"]:
            m, images, _ = sample_eval(model, spec["nfe"], seed=s, n=spec["n"], cfg_scale=1.0)
            sets.append(feature_stats(digits_features(images)))
            fds.append(m["fd"])
        return {"between": float(frechet_distance(*sets[0], *sets[1])), "to_real": fds, "n": spec["n"]}
    out = work / "models" / key
    if kind == "train_base":
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, str(HERE / "train_base.py"), "--steps", str(spec["steps"]), "--out", str(out)]
        subprocess.run(cmd, check=True, stdout=log, stderr=log, env={**os.environ, "OMP_NUM_THREADS": "1"})
        return {"path": str(out), "steps": spec["steps"]}
    if kind == "finetune":
        resume = (out / "checkpoints" / "latest.pt").exists()
        if not resume:
            shutil.rmtree(out, ignore_errors=True)
        print(f"fine-tune {key}: {json.dumps(spec)} (resume: {resume})", flush=True)
        t0 = time.perf_counter()
        fm.finetune(
            resolve_model(spec["init"], work),
            data="builtin:digits",
            objective=spec["objective"],
            mg_scale=spec["mg_scale"],
            train=spec["train"],
            steps=spec["steps"],
            batch_size=spec["batch_size"],
            lr=spec["lr"],
            out=str(out),
            loss=spec["loss"],
            derivative=spec["derivative"],
            **{k: spec[k] for k in MFRAE_FIELDS if k in spec},
            seed=spec["seed"],
            depth=spec["depth"],
            checkpoint_every=spec["checkpoint_every"],
            resume=resume,
            device="cpu",
            progress=False,
            grid=False,
            log_every=50,
        )
        train_s = time.perf_counter() - t0
        metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        shutil.rmtree(out / "raw", ignore_errors=True)
        tail = metrics[-max(1, len(metrics) // 10) :]
        return {
            "path": str(out),
            "train_s": round(train_s, 2),
            "s_per_step": round(train_s / spec["steps"], 3),
            "final_loss": float(np.mean([m.get("loss", float("nan")) for m in tail])),
            "resumed": resume,
        }
    raise ValueError(f"unknown job type {kind!r}")


def _sample_eval(sample_eval, model, spec):
    from flowmap_convert.sampling import sample as fm_sample

    if spec["batch_size"] == 500:
        return sample_eval(model, spec["nfe"], seed=spec["seed"], n=spec["n"], **_kw(spec))
    # evaluate_base.sample_eval fixes batch 500; the same computation with another batch size (noise is per sample)
    import numpy as np

    from flowmap_convert.digits import evaluate_digits

    t0 = time.time()
    images = fm_sample(
        model,
        nfe=spec["nfe"],
        classes=list(range(10)),
        num_samples=spec["n"],
        seed=spec["seed"],
        batch_size=spec["batch_size"],
        **_kw(spec),
    )
    sec = time.time() - t0
    return evaluate_digits(images, np.arange(spec["n"]) % 10), images, sec


def _kw(spec: dict) -> dict:
    return {"sampler": spec["sampler"], "cfg_scale": spec["cfg_scale"], "gamma": spec.get("gamma", 0.0)}


# ------------------------------------------------------------------------------------------------ scheduler
def cache_path(work: Path, key: str) -> Path:
    return work / "jobs" / f"{key}.json"


def load_cache(work: Path, keys) -> dict[str, dict]:
    """{key: cached record} for the jobs already done."""
    out = {}
    for k in keys:
        f = cache_path(work, k)
        if f.exists():
            try:
                out[k] = json.loads(f.read_text())
            except json.JSONDecodeError:
                pass  # a torn write: run it again
    return out


def save_cache(work: Path, key: str, spec: dict, result: dict) -> None:
    f = cache_path(work, key)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "spec": spec, "result": result}, indent=1) + "\n")
    os.replace(tmp, f)


def execute(plan: Plan, keys: list[str], work: Path, workers: int, log=print) -> tuple[dict, int, dict]:
    """Run the uncached jobs among `keys` (and their dependencies).

    Returns ({key: record}, jobs run, {key: error} for failed jobs and the jobs downstream of them); a failed job is
    not cached, so the next invocation tries it again, and the others still run.
    """
    from flowmap_convert.progress import Progress

    needed, stack = set(), list(keys)
    while stack:
        k = stack.pop()
        if k not in needed:
            needed.add(k)
            stack += plan.jobs[k].deps
    records = load_cache(work, needed)
    todo = {k for k in needed if k not in records}
    tails = critical_tails(plan)
    est_total = sum(round(plan.jobs[k].est_s) for k in todo)  # the units Progress counts
    prog = Progress(max(1, round(est_total)), "bench", unit="est-s", mode="lines", stream=sys.stdout, every=1e9)
    t_start, ran, failed = time.perf_counter(), 0, {}
    pool = None
    if workers > 1 and len(todo) > 1:
        pool = cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker)
    running: dict = {}

    def stamp() -> str:
        return time.strftime("%H:%M:%S")

    def start(k: str) -> float:
        todo.discard(k)
        log(f"[{stamp()}] start  {k} {_job_name(plan.jobs[k])} (est {plan.jobs[k].est_s / 60:.1f} min)")
        return time.perf_counter()

    def fail(k: str, err: BaseException) -> None:
        failed[k] = f"{type(err).__name__}: {err}"
        log(f"[{stamp()}] FAILED {k} {_job_name(plan.jobs[k])}: {failed[k]} (log: {work / 'logs' / (k + '.log')})")
        changed = True
        while changed:  # everything downstream of a failure is skipped
            changed = False
            for j in list(todo):
                if any(d in failed for d in plan.jobs[j].deps):
                    todo.discard(j)
                    failed[j] = f"skipped: upstream job {k} failed"
                    changed = True

    try:
        while todo or running:
            ready = sorted((k for k in todo if all(d in records for d in plan.jobs[k].deps)), key=lambda k: -tails[k])
            if pool is None:  # one process: the longest ready chain next
                if not ready:
                    raise RuntimeError(f"unsatisfiable dependencies: {sorted(todo)}")
                k = ready[0]
                t0 = start(k)
                try:
                    result = run_job(plan.jobs[k].spec, str(work))
                except Exception as e:  # noqa: BLE001 - one failed job must not stop a 90-minute run
                    fail(k, e)
                    continue
                _finish(plan, work, records, k, result, prog, log, stamp, t0, t_start)
                ran += 1
                continue
            for k in ready[: max(0, workers - len(running))]:
                running[pool.submit(run_job, plan.jobs[k].spec, str(work))] = (k, start(k))
            if not running:
                raise RuntimeError(f"unsatisfiable dependencies: {sorted(todo)}")
            done, _ = cf.wait(list(running), return_when=cf.FIRST_COMPLETED)
            for fut in done:
                k, t0 = running.pop(fut)
                try:
                    result = fut.result()
                except Exception as e:  # noqa: BLE001
                    fail(k, e)
                    continue
                _finish(plan, work, records, k, result, prog, log, stamp, t0, t_start)
                ran += 1
    except BaseException:
        if pool is not None:  # interrupted: do not wait for running fine-tunes (they resume from their checkpoints)
            pool.shutdown(wait=False, cancel_futures=True)
            pool = None
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    return records, ran, failed


def _job_name(job: Job) -> str:
    s = job.spec
    if s["type"] == "finetune":
        init = json.dumps(s["init"], sort_keys=True)
        return (
            f"finetune {s['objective']} {s['train']} depth {s['depth']} {s['steps']} steps seed {s['seed']} from {init}"
        )
    if s["type"] == "eval":
        return f"eval NFE {s['nfe']} {s['sampler']} model {json.dumps(s['model'])}"
    return s["type"]


def _finish(plan, work, records, k, result, prog, log, stamp, t0, t_start) -> None:
    job = plan.jobs[k]
    save_cache(work, k, job.spec, result)
    records[k] = {"key": k, "spec": job.spec, "result": result}
    prog.advance(round(job.est_s))
    log(
        f"[{stamp()}] finish {k} {_job_name(job)} in {time.perf_counter() - t0:.1f} s (est {job.est_s:.0f} s); "
        f"elapsed {(time.perf_counter() - t_start) / 60:.1f} min; {prog.line()}"
    )


# ------------------------------------------------------------------------------------------------ report
def chain_train_s(m: dict, plan: Plan, records: dict) -> float:
    """Training seconds behind a model spec (fine-tune chains and base training included)."""
    if "job" not in m or m["job"] not in records:
        return 0.0
    spec, res = records[m["job"]]["spec"], records[m["job"]]["result"]
    own = res.get("wall_s", 0.0)
    return own + (chain_train_s(spec["init"], plan, records) if spec["type"] == "finetune" else 0.0)


def collect(plan: Plan, records: dict) -> dict:
    """results.json content: rows with numbers (None while not run), floors, headline."""
    p = plan.p
    rows = []
    for r in plan.rows:
        rec = records.get(r.eval_key)
        res = rec["result"] if rec else None
        rows.append(
            {
                "row": r.group,
                "setting": r.label,
                "series": r.series,
                "nfe": r.nfe,
                "sampler": r.sampler,
                "cfg_scale": r.cfg,
                "fd": res["fd"] if res else None,
                "acc": res["acc"] if res else None,
                "samples": res["n"] if res else p.n,
                "eval_wall_s": res["wall_s"] if res else None,
                "train_wall_s": round(chain_train_s(r.model, plan, records), 1) if res else None,
                "command": row_command(r, plan),
                "job": r.eval_key,
            }
        )
    floors = {}
    for k, j in plan.jobs.items():
        if j.spec["type"] in ("real_floor", "seed_floor") and k in records:
            res = records[k]["result"]
            if j.spec["type"] == "real_floor":
                floors["real_halves"] = {**res, "what": "FD between two random halves of the 1797 real digits"}
            else:
                name = "seed_base" if j.spec["model"] == {"source": BASE} else "seed_headline"
                floors[name] = {
                    **res,
                    "what": f"FD between two {j.spec['n']}-sample sets (seeds {j.spec['seeds']}) of "
                    f"{describe_model(j.spec['model'], plan)} at {j.spec['nfe']} NFE; to_real: each set's FD to the real digits",
                    "nfe": j.spec["nfe"],
                }
    return {"rows": rows, "noise_floors": floors, "headline": headline(rows, p)}


def headline(rows: list[dict], p: Profile) -> dict:
    """The best 1-step (and 2-step) model of the run against the base's best FD at any NFE."""
    base = [r for r in rows if r["row"] == 1 and r["fd"] is not None and r["cfg_scale"] == 1.0]
    few = [r for r in rows if r["row"] >= 2 and r["fd"] is not None and r["sampler"] == "euler"]
    if not base:
        return {}
    b = min(base, key=lambda r: r["fd"])
    out = {"base_best": {"fd": b["fd"], "nfe": b["nfe"]}}
    for nfe, limit in ((1, 1.1), (2, 1.0)):
        for name, cand in (
            (f"nfe{nfe}", [r for r in few if r["nfe"] == nfe]),
            (f"shipped_nfe{nfe}", [r for r in few if r["nfe"] == nfe and r["row"] == 9]),
        ):
            if cand:
                best = min(cand, key=lambda r: r["fd"])
                ratio = best["fd"] / b["fd"]
                out[name] = {
                    "setting": best["setting"],
                    "fd": best["fd"],
                    "ratio": ratio,
                    "limit": limit,
                    "pass": ratio <= limit,
                    "job": best["job"],
                }
    return out


def _f(v, nd=2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def floors_line(res: dict) -> str:
    fl = res["noise_floors"]
    parts = []
    if "seed_base" in fl:
        s = fl["seed_base"]
        parts.append(
            f"base at {s['nfe']} NFE, seed vs seed: FD {s['between']:.2f} between the sets, "
            f"{s['to_real'][0]:.2f} / {s['to_real'][1]:.2f} to real (spread {abs(s['to_real'][0] - s['to_real'][1]):.2f})"
        )
    if "seed_headline" in fl:
        s = fl["seed_headline"]
        parts.append(
            f"headline model at 1 NFE, seed vs seed: FD {s['between']:.2f} between, {s['to_real'][0]:.2f} / "
            f"{s['to_real'][1]:.2f} to real (spread {abs(s['to_real'][0] - s['to_real'][1]):.2f})"
        )
    if "real_halves" in fl:
        r = fl["real_halves"]
        parts.append(f"two real halves: FD {r['mean']:.2f} ({r['min']:.2f}-{r['max']:.2f})")
    return "Noise floors: " + ("; ".join(parts) if parts else "not measured yet") + "."


def findings(res: dict, p: Profile) -> dict[int, list[str]]:
    """Short computed statements per row group (only from the numbers of this run)."""
    rows = [r for r in res["rows"] if r["fd"] is not None]
    out: dict[int, list[str]] = {}

    def fd(pred):
        c = [r for r in rows if pred(r)]
        return min(c, key=lambda r: r["fd"]) if c else None

    base_by_nfe = {r["nfe"]: r["fd"] for r in rows if r["row"] == 1 and r["cfg_scale"] == 1.0}
    lines = []
    for nfe in p.conv_nfe:
        b = fd(lambda r, n=nfe: r["row"] == 2 and r["nfe"] == n)
        if b and nfe in base_by_nfe:
            verdict = "beats" if b["fd"] < base_by_nfe[nfe] else "does not beat"
            lines.append(
                f"NFE {nfe}: best {b['setting']} FD {b['fd']:.2f} {verdict} the base's {base_by_nfe[nfe]:.2f}."
            )
    out[2] = lines
    lines = []
    for nfe in p.ft_nfe:
        b = fd(lambda r, n=nfe: r["row"] == 3 and r["nfe"] == n and f"{p.sweep_steps} steps" in r["setting"])
        c = fd(lambda r, n=nfe: r["row"] == 2 and r["nfe"] == n)
        if b:
            lines.append(
                f"NFE {nfe}: best fine-tuned ({p.sweep_steps} steps) is '{b['setting']}' (FD {b['fd']:.2f})"
                + (f"; best untrained conversion was '{c['setting']}' (FD {c['fd']:.2f})." if c else ".")
            )
    for nfe in p.ft_nfe:
        v = [  # one entry per length (the 300-step sweep row and the 300-step length row are the same job)
            f"{steps} steps FD {r['fd']:.2f}"
            for steps in p.lengths
            for r in rows
            if r["row"] == 3 and r["nfe"] == nfe and r["setting"] == f"DMF all, depth {p.best_depth}, {steps} steps"
        ]
        v = list(dict.fromkeys(v))
        if v:
            lines.append(f"NFE {nfe}, length (all parameters, depth {p.best_depth}): " + ", ".join(v) + ".")
    out[3] = lines
    lines = []
    for r in rows:
        if r["row"] == 4 and "scratch" in r["setting"]:
            conv = fd(lambda q, n=r["nfe"]: q["row"] == 4 and q["nfe"] == n and "converted" in q["setting"])
            if conv:
                lines.append(
                    f"NFE {r['nfe']}: {r['setting']} FD {r['fd']:.2f} vs converted + fine-tuned {conv['fd']:.2f} "
                    f"({'conversion better' if conv['fd'] < r['fd'] else 'scratch better or equal'})."
                )
    out[4] = lines
    lines = []
    for r in rows:
        if r["row"] == 5 and r["setting"].startswith(f"DMF mg {p.mg},"):
            ref = r["setting"].replace(f"DMF mg {p.mg},", "DMF mg 0.0,")
            q = fd(lambda q, n=r["nfe"], ref=ref: q["row"] == 5 and q["nfe"] == n and q["setting"] == ref)
            if q:
                what = r["setting"].split(", ")[1]
                lines.append(
                    f"{what}, NFE {r['nfe']}: mg {p.mg} FD {r['fd']:.2f} vs mg 0 {q['fd']:.2f} ({r['fd'] - q['fd']:+.2f})."
                )
    out[5] = lines
    lines = []
    for nfe in p.ft_nfe:  # each MF-RAE chain and DMF over the seeds: FD mean +- std, and the mean train wall
        groups: dict[str, list[dict]] = {}
        for r in rows:
            if r["row"] == 6 and r["nfe"] == nfe and r["fd"] is not None and ", seed " in r["setting"]:
                groups.setdefault(r["setting"].rsplit(", seed ", 1)[0], []).append(r)
        parts = []
        for name, rs in groups.items():
            v = [r["fd"] for r in rs]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            wall = statistics.mean(r["train_wall_s"] or 0.0 for r in rs)
            parts.append(f"{name} FD {statistics.mean(v):.2f} +- {sd:.2f} ({len(v)} seeds, train wall {wall:.0f} s)")
        if parts:
            lines.append(f"NFE {nfe}: " + "; ".join(parts) + ".")
        jv = fd(lambda r, n=nfe: r["row"] == 6 and r["nfe"] == n and r["setting"].endswith("derivative jvp"))
        fdr = fd(lambda r, n=nfe: r["row"] == 6 and r["nfe"] == n and r["setting"].endswith("derivative fd"))
        if jv and fdr:
            lines.append(
                f"NFE {nfe}: JVP FD {jv['fd']:.2f} ({jv['train_wall_s']:.0f} s) vs finite differences {fdr['fd']:.2f} "
                f"({fdr['train_wall_s']:.0f} s)."
            )
    out[6] = lines
    lines = []
    for nfe in p.sampler_nfe:
        b = fd(lambda r, n=nfe: r["row"] == 7 and r["nfe"] == n)
        if b:
            lines.append(f"NFE {nfe}: best sampler is {b['sampler']} (FD {b['fd']:.2f}).")
    out[7] = lines
    seeds = [r for r in rows if r["row"] == 8]
    lines = []
    for nfe in p.ft_nfe:
        v = [r["fd"] for r in seeds if r["nfe"] == nfe]
        if len(v) > 1:
            mean = sum(v) / len(v)
            sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1))
            lines.append(
                f"NFE {nfe}: FD mean {mean:.2f}, std {sd:.2f}, range {min(v):.2f}-{max(v):.2f} ({len(v)} seeds)."
            )
    out[8] = lines
    return out


def write_results_md(path: Path, res: dict, plan: Plan, meta: dict) -> None:
    p = plan.p
    L = [
        "# Digits benchmark (`make bench-digits`)",
        "",
        "Generated by `benchmarks/digits/bench.py`; do not edit by hand (re-run it). Raw numbers: `results.json`; "
        "plot: `fd_vs_nfe.png`.",
        "",
        f"- Command: `{meta['command']}` (profile `{p.name}`), commit {meta['commit']}, {meta['date']}.",
        f"- Machine: {meta['machine']}; {meta['workers']} worker process(es), one torch thread each.",
        f"- This invocation: {meta['jobs_run']} jobs run, {meta['jobs_cached']} from the cache "
        f"({meta['wall_s'] / 60:.1f} min wall); summed job wall of all rows: {meta['sum_job_wall_s'] / 60:.1f} min.",
        f"- Failed or skipped jobs (their rows show -; re-run to retry): {len(meta['jobs_failed'])}"
        + "".join(f"; `{k}` {v}" for k, v in meta["jobs_failed"].items()),
        f"- Evaluation: {p.n} samples per row, sampling seed {p.seed}, classes cycled 0..9, digits FD of the builtin "
        "classifier's 64-d features to all 1797 real digits, acc = share classified as their conditioning class.",
        f"- Fine-tuning: `fm.finetune(..., data='builtin:digits', objective='dmf', batch_size={p.batch}, lr={p.lr}, "
        f"seed={p.ft_seed})` unless the row says otherwise; EMA weights evaluated. Train wall = the fine-tune (and any "
        "upstream training) behind the row; eval wall = sampling + features.",
        "",
        "## Headline",
        "",
    ]
    h = res["headline"]
    if h:
        b = h["base_best"]
        for what, prefix in (
            ("Best {nfe}-step model of the run", "nfe"),
            (f"Shipped {SHIPPED} at {{nfe}} NFE", "shipped_nfe"),
        ):
            for nfe in (1, 2):
                x = h.get(f"{prefix}{nfe}")
                if x:
                    L.append(
                        f"- {what.format(nfe=nfe)}: {x['setting']}, FD {x['fd']:.2f} = **{x['ratio']:.2f}x** the base's "
                        f"best FD {b['fd']:.2f} (Euler, no guidance, at {b['nfe']} NFE); acceptance <= {x['limit']}x: "
                        f"**{'PASS' if x['pass'] else 'FAIL'}** (same run, same sampling seed)."
                    )
    else:
        L.append("- Not available yet (row 1 not run).")
    L += ["- " + floors_line(res), ""]
    fnd = findings(res, p)
    for g, title in ROW_TITLES.items():
        if g == 0:
            continue
        rows = [r for r in res["rows"] if r["row"] == g]
        L += [f"## {g}. {title}", "", floors_line(res), ""]
        for s in fnd.get(g, []):
            L.append(f"- {s}")
        if fnd.get(g):
            L.append("")
        L += [
            "| setting | NFE | FD | acc | samples | train wall (s) | eval wall (s) | command |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in rows:
            L.append(
                f"| {r['setting']} | {r['nfe']} | {_f(r['fd'])} | {_f(r['acc'], 3)} | {r['samples']} | "
                f"{_f(r['train_wall_s'], 0)} | {_f(r['eval_wall_s'], 1)} | `{r['command']}` |"
            )
        L.append("")
    L += ["## Noise floors", "", "| floor | value | how |", "|---|---|---|"]
    for name, f in res["noise_floors"].items():
        if name == "real_halves":
            L.append(f"| {name} | {f['mean']:.2f} ({f['min']:.2f}-{f['max']:.2f}) | {f['what']}, 5 seeded splits |")
        else:
            L.append(
                f"| {name} | {f['between']:.2f} (to real {f['to_real'][0]:.2f} / {f['to_real'][1]:.2f}) | {f['what']} |"
            )
    L.append("")
    path.write_text("\n".join(L))


def plot(path: Path, res: dict) -> None:
    """FD (log scale) against NFE (log2) for every model series; matplotlib if installed, else PIL."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in res["rows"]:
        if r["fd"] is not None and r["row"] != 7 and r["series"]:  # "" : a further seed of a plotted series
            name = r["series"]
            series.setdefault(name, [])
            if (r["nfe"], r["fd"]) not in series[name]:
                series[name].append((r["nfe"], r["fd"]))
    for r in res["rows"]:
        if r["fd"] is not None and r["row"] == 7:
            series.setdefault(f"headline, {r['sampler']}", []).append((r["nfe"], r["fd"]))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(11, 7))
        for name, pts in series.items():
            pts.sort()
            ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel("digits FD")
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        return
    except ImportError:
        pass
    from PIL import Image, ImageDraw

    W, H, L, T, PW, PH = 1400, 900, 70, 30, 760, 800
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    pts_all = [pt for pts in series.values() for pt in pts]
    if not pts_all:
        im.save(path)
        return
    xs = [math.log2(a) for a, _ in pts_all]
    ys = [math.log10(max(b, 1e-3)) for _, b in pts_all]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = math.floor(min(ys)), math.ceil(max(max(ys), min(ys) + 0.1))

    def px(a, b):
        return (
            L + (math.log2(a) - x0) / (x1 - x0) * PW,
            T + PH - (math.log10(max(b, 1e-3)) - y0) / (y1 - y0) * PH,
        )

    d.rectangle([L, T, L + PW, T + PH], outline="black")
    for e in range(int(x0), int(x1) + 1):
        x, _ = px(2**e, 10**y0)
        d.line([x, T + PH, x, T + PH + 5], fill="black")
        d.text((x - 6, T + PH + 8), str(2**e), fill="black")
    for e in range(y0, y1 + 1):
        _, y = px(2**x0, 10**e)
        d.line([L - 5, y, L + PW, y], fill=(220, 220, 220))
        d.text((L - 50, y - 6), f"1e{e}", fill="black")
    d.text((L + PW // 2, H - 25), "NFE (log2)", fill="black")
    d.text((5, T - 20), "digits FD (log10)", fill="black")
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    palette += [(227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
    for i, (name, pts) in enumerate(series.items()):
        c = palette[i % len(palette)]
        dash = i // len(palette)
        pts = sorted(pts)
        xy = [px(a, b) for a, b in pts]
        if len(xy) > 1:
            d.line(xy, fill=c, width=2 if dash == 0 else 1)
        for x, y in xy:
            r = 3 + dash
            (d.rectangle if dash % 2 else d.ellipse)([x - r, y - r, x + r, y + r], outline=c, fill=c)
        ly = T + 12 * i
        d.line([L + PW + 20, ly + 6, L + PW + 40, ly + 6], fill=c, width=2)
        (d.rectangle if dash % 2 else d.ellipse)([L + PW + 27, ly + 3, L + PW + 33, ly + 9], fill=c)
        d.text((L + PW + 45, ly), name[:80], fill="black")
    im.save(path)


def ship(res: dict, plan: Plan, records: dict, work: Path, dest: Path, log=print) -> None:
    """Export the run's best 1-step model (EMA weights, config, card) to dest, the way `flowmap convert --out` writes.

    The shipped builtin itself (row 9) is not a candidate: --ship is how a new builtin is made. dest is replaced only
    when flowmap wrote it (flowmap_convert.outputs), so a directory the user made is never removed.
    """
    from flowmap_convert.outputs import MARKER_NAME, atomic_dir

    cand = [
        r
        for r in res["rows"]
        if r["row"] not in (1, 9) and r["nfe"] == 1 and r["fd"] is not None and r["sampler"] == "euler"
    ]
    if not cand:
        raise SystemExit("--ship: no 1-step row has run yet")
    best = min(cand, key=lambda r: r["fd"])
    model = plan.jobs[best["job"]].spec["model"]
    with atomic_dir(dest, "model") as tmp:
        if "job" in model and "depth" not in model:
            src = Path(records[model["job"]]["result"]["path"])
            skip = shutil.ignore_patterns("checkpoints", "raw", "samples", ".export.*", MARKER_NAME)
            shutil.copytree(src, tmp, ignore=skip, dirs_exist_ok=True)
        else:  # an untrained conversion
            from flowmap_convert.io import write_model_dir

            write_model_dir(resolve_model(model, work), tmp)
    log(f"shipped the best 1-step model ({best['setting']}, FD {best['fd']:.2f}) to {dest}")


REPORT_FILES = ("RESULTS.md", "results.json", "fd_vs_nfe.png")


def check_out_dir(out_dir: Path) -> None:
    """Refuse an --out-dir whose report files this script did not write (one line, exit 2), before any job runs."""
    try:
        ours = "meta" in json.loads((out_dir / "results.json").read_text()) and (
            out_dir / "RESULTS.md"
        ).read_text().startswith("# Digits benchmark")
    except (OSError, ValueError, TypeError):
        ours = False
    present = [n for n in REPORT_FILES if (out_dir / n).exists()]
    if present and not ours:
        print(
            f"error: --out-dir {out_dir} holds {', '.join(present)} that make bench-digits did not write; "
            "choose another --out-dir.",
            file=sys.stderr,
        )
        raise SystemExit(2)


def check_ship(dest: Path | None) -> None:
    """Refuse a --ship directory flowmap may not replace before any job runs (one line, exit 2)."""
    if dest is None:
        return
    from flowmap_convert.errors import FlowmapError
    from flowmap_convert.outputs import check_output

    try:
        check_output(dest, "model", flag="--ship")
    except FlowmapError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


# ------------------------------------------------------------------------------------------------ main
def git_commit() -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
            ).stdout.strip()
            or "?"
        )
    except OSError:
        return "?"


def select(plan: Plan, only: str | None, cached: set[str] | frozenset = frozenset()) -> list[str]:
    """The job keys of the selected row groups and their dependencies (all jobs when only is empty).

    The noise floors come along whenever the model they sample is selected or already cached (so `--only 1` does
    not start the headline fine-tune just for its seed-to-seed floor).
    """
    if not only:
        return list(plan.jobs)
    groups = {int(g) for g in only.split(",") if g.strip()}
    bad = groups - set(ROW_TITLES)
    if bad:
        raise SystemExit(f"--only: unknown rows {sorted(bad)}; choose from {sorted(ROW_TITLES)}")
    keys = [k for k, j in plan.jobs.items() if j.rows & groups]
    chosen = set(keys)
    for k, j in plan.jobs.items():
        floor = j.spec["type"] in ("real_floor", "seed_floor")
        if floor and k not in chosen and all(d in chosen or d in cached for d in j.deps):
            keys.append(k)
    return keys


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="full")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (one torch thread each)")
    ap.add_argument("--work", type=Path, default=HERE / ".bench-cache", help="job cache and model directory")
    ap.add_argument("--out-dir", type=Path, default=HERE, help="where RESULTS.md, results.json, fd_vs_nfe.png go")
    ap.add_argument("--only", default="", help="comma-separated row numbers to run (1-9; floors always)")
    ap.add_argument("--force", action="store_true", help="ignore the cache for the selected rows' jobs")
    ap.add_argument("--plan", action="store_true", help="print the plan and exit")
    ap.add_argument("--ship", type=Path, default=None, help="export the best 1-step model to this directory")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    check_out_dir(args.out_dir)
    check_ship(args.ship)
    t0 = time.perf_counter()
    plan = build_plan(PROFILES[args.profile])
    work = args.work.resolve()
    keys = select(plan, args.only, set(load_cache(work, plan.jobs)))
    if args.force:
        for k in keys:
            cache_path(work, k).unlink(missing_ok=True)
    cached = set(load_cache(work, plan.jobs))
    print_plan(plan, keys, cached, args.workers)
    if args.plan:
        return {"meta": {"jobs_failed": {}}}
    records, ran, failed = execute(plan, keys, work, args.workers)
    records = {**load_cache(work, plan.jobs), **records}  # rows outside --only are reported from the cache
    res = collect(plan, records)
    import torch

    meta = {
        "command": " ".join(["python benchmarks/digits/bench.py", *(argv if argv is not None else sys.argv[1:])]),
        "profile": plan.p.name,
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs (shared), torch {torch.__version__}",
        "workers": args.workers,
        "jobs_run": ran,
        "jobs_cached": max(0, len(keys) - ran - len(failed)),
        "jobs_failed": failed,
        "wall_s": round(time.perf_counter() - t0, 1),
        "sum_job_wall_s": round(sum(r["result"].get("wall_s", 0.0) for r in records.values()), 1),
        "estimates": COST,
    }
    res = {"meta": meta, **res}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    write_results_md(args.out_dir / "RESULTS.md", res, plan, meta)
    plot(args.out_dir / "fd_vs_nfe.png", res)
    print(f"wrote {args.out_dir / 'RESULTS.md'}, results.json, fd_vs_nfe.png; {ran} jobs run in {meta['wall_s']:.0f} s")
    if args.ship:
        ship(res, plan, records, work, args.ship)
    if failed:
        print(f"{len(failed)} jobs failed or were skipped (not cached; re-run to retry):", file=sys.stderr)
        for k, msg in failed.items():
            print(f"  {k} {_job_name(plan.jobs[k])}: {msg}", file=sys.stderr)
    return res


if __name__ == "__main__":
    sys.exit(1 if main()["meta"]["jobs_failed"] else 0)
