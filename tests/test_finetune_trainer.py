"""Trainer: decoder-only freezing, export, non-finite skip and rollback, dry run, SIGKILL + resume."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import torch
from conftest import randomize, tiny_config
from finetune_cli import ONE_THREAD, finetune_argv, run_ok, write_run_inputs


def small_model(**over):
    from flowmap_convert.model import FlowMap

    torch.manual_seed(0)
    return randomize(FlowMap(tiny_config(num_blocks=3, **over)), std=0.05).with_depth(2)


def small_data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=g).clamp(-1, 1), torch.randint(0, 10, (n,), generator=g)


def read_metrics(path):
    return [json.loads(line) for line in open(path)]


def test_decoder_only_keeps_encoder_bit_identical_and_exports(tmp_path):
    from flowmap_convert.finetuning import finetune
    from flowmap_convert.model import read_model_dir
    from flowmap_convert.outputs import is_model_dir

    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ema = finetune(
        model,
        data=small_data(),
        train="decoder",
        steps=4,
        batch_size=4,
        lr=1e-3,
        out=tmp_path / "run",
        mg_scale=0.5,
        checkpoint_every=2,
        progress=False,
    )
    after = model.state_dict()
    enc = ("net.x_embedder.", "net.t_embedder.", "net.y_embedder.", "net.pos_embed", "net.blocks.0.", "net.blocks.1.")
    for k, v in before.items():
        if k.startswith(enc):
            assert torch.equal(v, after[k]), k
    assert not torch.equal(before["net.blocks.2.mlp.fc1.weight"], after["net.blocks.2.mlp.fc1.weight"])
    assert not torch.equal(
        after["logvar_linear.weight"], torch.zeros_like(after["logvar_linear.weight"])
    )  # added, zero-init, trained
    out = tmp_path / "run"
    assert is_model_dir(out) and is_model_dir(out / "raw") and (out / "grid.png").is_file()
    loaded = read_model_dir(out)
    cfg = loaded.config
    assert cfg.training["recipe"]["train"] == "decoder" and cfg.training["guidance"]["mg_scale"] == 0.5
    assert cfg.training["weights"] == "ema" and cfg.sampling["sampler"] == "euler" and cfg.logvar
    for k, v in ema.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    assert torch.equal(
        read_model_dir(out / "raw").state_dict()["net.final_layer.linear.weight"],
        after["net.final_layer.linear.weight"],
    )
    assert "Training recipe" in (out / "README.md").read_text()
    assert len(read_metrics(out / "metrics.jsonl")) == 4


def test_non_finite_steps_are_skipped_then_rolled_back(tmp_path, monkeypatch):
    from flowmap_convert.finetuning import finetune, objectives
    from flowmap_convert.finetuning import trainer as trainer_mod

    calls = {"n": 0}
    real = objectives.OBJECTIVE_FNS["fm"]

    def flaky(ctx, x0, y, gen):
        calls["n"] += 1
        loss, m = real(ctx, x0, y, gen)
        # call 4 alone is bad (skipped); calls 7..9 are a run of 3 (rollback to the step-2 checkpoint)
        if calls["n"] == 4 or 7 <= calls["n"] <= 9:
            loss = loss * float("nan")
        return loss, m

    monkeypatch.setitem(trainer_mod.OBJECTIVE_FNS, "fm", flaky)
    messages = []

    class Console:
        def print(self, msg, **kw):
            messages.append(msg)

    finetune(
        small_model(),
        data=small_data(),
        objective="fm",
        steps=6,
        batch_size=4,
        out=tmp_path / "run",
        checkpoint_every=2,
        max_bad_steps=3,
        progress=False,
        console=Console(),
        log_every=100,
        grid=False,
    )
    text = "\n".join(messages)
    assert "non-finite loss or gradient at step 4: skipped" in text
    assert "3 non-finite steps in a row at step 6; rolled back to the checkpoint at step 4" in text
    ms = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert ms[-1]["step"] == 6 and ms[-1]["skipped_total"] == 4


def test_dry_run_writes_nothing_and_reports(tmp_path):
    from flowmap_convert.finetuning import finetune

    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = finetune(
        model,
        data=small_data(),
        steps=5,
        batch_size=4,
        out=tmp_path / "run",
        dry_run=True,
        dry_run_steps=2,
        train="decoder",
    )
    assert not (tmp_path / "run").exists()
    assert (
        rep["parameters"]["trainable"] < rep["parameters"]["total"]
        and rep["seconds_per_step"] > 0
        and rep["peak_memory_bytes"] > 0
    )
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def _cli(tmp_path, out, steps, extra=()):
    flags = dict(checkpoint_every=3, lr="1e-3", mg_scale=0.5, log_every=1000)
    return [*finetune_argv(tmp_path, out, depth=2, steps=steps, batch_size=4, **flags), *extra]


def test_stop_and_resume_in_process_reproduces_the_loss_trace(tmp_path):
    """Fast variant: a run stopped at step 3 and resumed to 6 matches an uninterrupted 6-step run."""
    from flowmap_convert.finetuning import finetune

    kw = dict(
        data=small_data(), steps=6, batch_size=4, lr=1e-3, mg_scale=0.5, progress=False, grid=False, log_every=100
    )
    finetune(small_model(), out=tmp_path / "ref", **kw)
    finetune(small_model(), out=tmp_path / "run", **{**kw, "steps": 3})
    finetune(small_model(), out=tmp_path / "run", resume=True, **kw)
    a = read_metrics(tmp_path / "ref" / "metrics.jsonl")
    b = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
    assert all(abs(x["loss"] - y["loss"]) <= 1e-6 for x, y in zip(a, b))


@pytest.mark.e2e
@pytest.mark.slow
def test_sigkill_and_resume_reproduce_the_loss_trace(tmp_path):
    write_run_inputs(tmp_path, small_model(), *small_data())
    steps = 10
    run_ok(_cli(tmp_path, tmp_path / "ref", steps))
    run = tmp_path / "run"
    proc = subprocess.Popen(
        _cli(tmp_path, run, steps), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ONE_THREAD
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if (
            (run / "checkpoints" / "latest.pt").exists()
            and metrics.exists()
            and len(metrics.read_text().splitlines()) >= 5
        ):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    ck = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    resumed_at = ck["step"]
    assert 0 < resumed_at < steps
    run_ok(_cli(tmp_path, run, steps, ["--resume"]))
    a = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "ref" / "metrics.jsonl")}
    b = {m["step"]: m["loss"] for m in read_metrics(metrics)}
    assert sorted(b) == list(range(1, steps + 1))
    for s in range(resumed_at + 1, steps + 1):
        assert abs(a[s] - b[s]) <= 1e-6, (s, a[s], b[s])


def test_attention_option_holds_for_the_run_only(tmp_path, monkeypatch):
    """--attention math: every attention call of the fine-tune runs with math as the default backend, and after it
    (and after a dry run) the process default is what it was, not the run's choice."""
    from flowmap_convert import dit, kernels
    from flowmap_convert.finetuning import finetune

    seen = []

    def spy(q, k, v, *args, **kwargs):
        seen.append(kernels.get_default_backend())
        return kernels.attention(q, k, v, *args, **kwargs)

    monkeypatch.setattr(dit, "attention", spy)
    before = kernels.get_default_backend()
    assert before != "math"
    kw = dict(data=small_data(8), steps=2, batch_size=4, attention="math", progress=False, grid=False)
    finetune(small_model(), out=tmp_path / "run", **kw)
    assert seen and set(seen) == {"math"}
    assert kernels.get_default_backend() == before
    seen.clear()
    finetune(small_model(), out=tmp_path / "dry", dry_run=True, dry_run_steps=1, **kw)
    assert seen and set(seen) == {"math"} and kernels.get_default_backend() == before


def test_missing_tracker_is_a_user_error(monkeypatch):
    import importlib.util

    from flowmap_convert.errors import FlowmapError
    from flowmap_convert.finetuning.trainer import check_trackers

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FlowmapError, match="pip install wandb"):
        check_trackers("wandb")
    with pytest.raises(FlowmapError, match="unknown tracker"):
        check_trackers("nope")
    check_trackers(None)


def test_every_trainable_parameter_gets_a_gradient_for_ddp():
    """DDP (find_unused_parameters=False) needs a gradient for each parameter that trains, for every objective;
    a log-variance head an mse loss does not use is frozen."""
    import tempfile

    from flowmap_convert.finetuning.recipe import Recipe
    from flowmap_convert.finetuning.trainer import Trainer

    for obj, train, loss in [
        ("dmf", "all", "mse"),
        ("mfd", "decoder", "adaptive"),
        ("dmf", "decoder+time", "mfrae"),
        ("cmt", "all", "adaptive"),
    ]:
        model = small_model()
        model.logvar_linear = torch.nn.Linear(256, 1)  # a head from an earlier adaptive-loss fine-tune
        rec = Recipe(objective=obj, train=train, loss=loss, batch_size=2, steps=1, cmt_states=2)
        tr = Trainer(model, small_data(8), rec, out=tempfile.mkdtemp(), device="cpu", progress=False)
        loss_value, _ = tr.wrapped(*small_data(2), torch.Generator().manual_seed(0))
        loss_value.backward()
        assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == [], (obj, train)
        assert model.logvar_linear.weight.requires_grad == (loss == "adaptive")
