"""The papers' recipes: each field against the paper or the released code (cited per line), the recipe a model
gets, the plan, the record a resume continues, MF-RAE's stages and teacher, and options generated from declarations."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from conftest import randomize, tiny_config
from typer.testing import CliRunner

from flowmap_convert.config import LatentSpace
from flowmap_convert.errors import FlowmapError
from flowmap_convert.finetuning.recipes import RECIPES, default_recipe, get, resolve


def fields(name, stage=None):
    """The Recipe a named recipe resolves to (one stage of a staged one)."""
    named = get(name)
    stages = resolve(named, {}, named.stage_names() or None)
    return next(r.recipe for r in stages if stage is None or r.stage == stage)


# ---------------------------------------------------------------------------------------------------- per recipe
@pytest.mark.parametrize(
    "name, column, depth, mg, interval, steps",
    [
        # DMF Tab. 6 columns B/2, L/2, XL/2+REPA (256) and XL/2+REPA (512): 'DMF depth', 'Model guidance scale',
        # 'Guidance interval', 'DMF flow map training: Training iteration'
        ("dmf-b2-256", "B/2", 8, 0.5, (0.0, 1.0), 400_000),
        ("dmf-l2-256", "L/2", 18, 0.6, (0.0, 0.7), 400_000),
        ("dmf-xl2-256", "XL/2", 20, 0.6, (0.0, 0.7), 400_000),
        ("dmf-xl2-512", "XL/2 512", 20, 0.6, (0.0, 0.8), 700_000),
    ],
)
def test_dmf_recipes_match_tab6(name, column, depth, mg, interval, steps):
    r = fields(name)
    assert r.objective == "dmf" and r.train == "all"
    assert r.depth == depth  # Tab. 6 'DMF depth'
    assert r.mg_scale == mg  # Tab. 6 'Model guidance scale'
    assert r.guidance_interval == interval  # Tab. 6 'Guidance interval'
    assert r.steps == steps  # Tab. 6 'Training iteration' (App. E: 700K at 512)
    assert r.global_batch == 256 and r.batch_size is None  # Tab. 6 'Batch size' 256 (global)
    assert r.lr == 1e-4 and r.betas == (0.9, 0.95) and r.weight_decay == 0.0  # Tab. 6 optimisation rows
    assert r.ema == 0.9999 and r.ema_warmup is False  # Tab. 6 'EMA decay rate'
    assert r.label_dropout == 0.1  # Tab. 6 'Class dropout probability'
    assert r.fm_mean == 0.0 and r.time_proposal == (0.4, -1.2)  # Tab. 6 'Time proposal' rows
    assert r.time_std == 1.0 and r.fm_std == 1.0  # DMF train script: P_std 1.0 (docs/objectives.md)
    assert r.grad_clip == 1.0  # DMF train script: grad clip 1.0
    assert r.loss == "adaptive" and r.logvar_eps == 0.01 and r.derivative == "jvp"  # DMF loss.py log_lv_loss, jvp
    at512 = name.endswith("512")
    assert r.qk_norm is at512  # Tab. 6 'QK norm' (only the 512 column), App. E
    assert r.sample_shift == (1.5 if at512 else 1.0)  # App. C: shift 1.5 for ImageNet 512, none at 256
    for k, (_, source) in get(name).values.items():
        assert source, k  # every value names its source


def test_mf_rae_256_stages_match_the_paper_and_released_code():
    named = get("mf-rae-256")
    assert named.default_stages == ("cmt", "mfd")  # MF-RAE Sec. 4: CMT -> MFD at 256 (MFT optional, Sec. 3.4)
    cmt, mfd, mft = (fields("mf-rae-256", s) for s in ("cmt", "mfd", "mft"))
    assert cmt.objective == "cmt" and cmt.loss == "mse"  # Eq. 3, training_losses_cmt_v2: plain MSE
    assert cmt.cmt_states == 16  # Sec. 3.2: 16-step Euler teacher trajectory
    assert cmt.cmt_pairs == 64  # training_losses_cmt_v2: 64 pairs per trajectory
    assert cmt.ema == 0.999 and cmt.global_batch == 8 and cmt.grad_accum == 2  # CMT config
    assert cmt.steps == 27_000  # Sec. 4: CMT mid-training for 27K iterations
    for r in (mfd, mft):
        assert r.loss == "mfrae" and r.adaptive_c == 1e-3 and r.adaptive_p == 1.0  # w = sg(1/(m^2 + 1e-3)), w m^2
        assert r.derivative == "fd" and r.fd_delta == 5e-3  # finite differences, delta_t 5e-3
        assert r.ratio_r_neq_t == 0.25  # sample_mf ratio 1/4
        assert r.global_batch == 256 and r.grad_accum == 4  # Sec. 4 batch 256; MF_XL config accum 4
        assert r.ema == 0.9999 and r.lr == 1e-4  # Sec. 4 'Hyperparameter Simplicity'
    assert mfd.objective == "mfd" and mfd.steps == 180_000  # Sec. 4: MFD 36 epochs / 180K iterations
    assert mft.objective == "mft"
    for r in (cmt, mfd, mft):
        assert r.mg_scale == 0.0 and r.label_dropout == 0.1  # no guidance; 10 % null labels (train code)
        assert r.time_shift is None  # sqrt(C H W / 4096) from the model (sample_mf with RAE's shift)
        assert r.teacher is None  # the pretrained flow model the run started from


def test_mf_rae_512_differs_where_the_paper_says():
    named = get("mf-rae-512")
    assert named.default_stages == ("cmt", "mfd", "mft")  # Sec. 4.3: MFD 20K then MFT 10K at 512
    cmt, mfd, mft = (fields("mf-rae-512", s) for s in ("cmt", "mfd", "mft"))
    assert cmt.cmt_pairs == 8  # training_losses_cmt_512: 8 pairs per trajectory
    assert mfd.steps == 20_000 and mft.steps == 10_000  # Sec. 4.3
    assert mfd.global_batch == 128 and mft.global_batch == 128  # Sec. 4: batch 128 at 512
    assert mfd.ema == 0.9995 and mft.ema == 0.9995  # Sec. 4: EMA 0.9995 at 512


def test_digits_recipe_is_the_builtins():
    r = fields("digits")  # benchmarks/digits/FINETUNE.md: 200 steps x 32, no guidance, 1 - 10/steps EMA
    assert (r.objective, r.steps, r.batch_size, r.global_batch, r.mg_scale, r.ema) == ("dmf", 200, 32, None, 0.0, -1.0)


def test_the_latent_shift_is_sqrt_48_for_rae_256():
    from flowmap_convert.finetuning.recipe import latent_shift

    cfg = tiny_config(in_channels=768, input_size=16, patch_size=1, latent=LatentSpace(channels=768, size=16))
    assert abs(latent_shift(cfg) - 48**0.5) < 1e-12  # MF-RAE sample_mf: RAE shift sqrt(768 * 16 * 16 / 4096)


# ---------------------------------------------------------------------------------------------------- the model's recipe
def _cfg(arch="dit", blocks=28, hidden=1152, res=256, classes=1000, **kw):
    return tiny_config(
        arch=arch,
        num_blocks=blocks,
        hidden_size=hidden,
        num_heads=16,
        num_classes=classes,
        class_embed_rows=classes + 1,
        latent=LatentSpace(kind="sd-vae", channels=4, size=res // 8, image_channels=3, image_size=res),
        **kw,
    )


@pytest.mark.parametrize(
    "cfg, name",
    [
        (_cfg(), "dmf-xl2-256"),
        (_cfg(res=512), "dmf-xl2-512"),
        (_cfg(blocks=24, hidden=1024), "dmf-l2-256"),
        (_cfg(blocks=12, hidden=768), "dmf-b2-256"),
        (_cfg(blocks=12, hidden=768, classes=10), None),
        (_cfg(arch="lightningdit", patch_size=1), "dmf-xl2-256"),  # LightningDiT-XL/1: the same size rule
        (_cfg(arch="mcg-ddt", extra={"encoder_blocks": 22}), "dmf-xl2-256"),  # DDT-XL/2
    ],
)
def test_the_default_recipe_follows_from_the_model(cfg, name):
    assert default_recipe(cfg, "some/model")[0] == name
    assert default_recipe(cfg, "builtin:digits-sit")[0] == "digits"


def test_ddt_keeps_its_own_split_under_the_xl_recipe_unless_depth_is_typed():
    from flowmap_convert.finetuning.recipes import model_values

    cfg = _cfg(arch="mcg-ddt", extra={"encoder_blocks": 22})
    r = resolve(get("dmf-xl2-256"), {}, None, model_values(cfg))[0]
    assert r.recipe.depth == 22 and r.origins["depth"].startswith("model")
    assert get("dmf-xl2-256").values["depth"][0] == 20  # what a SiT-XL/2 gets
    assert resolve(get("dmf-xl2-256"), {"depth": 18}, None, model_values(cfg))[0].recipe.depth == 18
    assert model_values(_cfg()) == {}


def test_options_override_one_field_and_batch_size_drops_the_global_batch():
    r = resolve(get("dmf-xl2-256"), {"lr": 5e-5, "batch_size": 16})[0]
    assert r.recipe.lr == 5e-5 and r.origins["lr"] == "option"
    assert r.recipe.batch_size == 16 and r.recipe.global_batch is None
    assert r.recipe.mg_scale == 0.6 and r.origins["mg_scale"].startswith("recipe dmf-xl2-256: DMF Tab. 6")
    assert r.recipe.per_process_batch(4) == 16
    g = resolve(get("dmf-xl2-256"), {"grad_accum": 4})[0].recipe
    assert g.per_process_batch(8) == 8  # 256 / (8 processes x 4 accumulation steps)
    with pytest.raises(FlowmapError, match="`global_batch` 256 does not split over 3"):
        g.per_process_batch(3)
    with pytest.raises(FlowmapError, match="unknown `recipe`"):
        get("dmf-xxl")
    with pytest.raises(FlowmapError, match="`stages` mfd,bogus does not fit"):
        resolve(get("mf-rae-256"), {}, ("mfd", "bogus"))


def test_list_recipes_prints_every_recipe():
    from flowmap_convert.cli import app

    r = CliRunner().invoke(app, ["finetune", "--list-recipes"])
    assert r.exit_code == 0, r.output
    for name in RECIPES:
        assert name in r.output
    assert "mft (optional)" in r.output and "256 global" in r.output


# ---------------------------------------------------------------------------------------------------- runs
def velocity_model():
    from flowmap_convert.model import FlowMap

    torch.manual_seed(0)
    return randomize(FlowMap(tiny_config(num_blocks=3)), std=0.05)


def small_data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=g).clamp(-1, 1), torch.randint(0, 10, (n,), generator=g)


TINY = dict(steps=2, batch_size=2, grad_accum=1, cmt_pairs=2, cmt_states=3, progress=False, grid=False, log_every=100)


def test_mf_rae_runs_cmt_then_mfd_with_the_source_as_teacher(tmp_path, monkeypatch):
    """After CMT changed the student, the MFD teacher's velocity equals the source's to 1e-6 and is not u(x, t, t)."""
    from flowmap_convert.finetuning import finetune, trainer
    from flowmap_convert.model import read_model_dir

    built = []
    init = trainer.Trainer.__init__

    def spy(self, *a, **k):
        init(self, *a, **k)
        built.append(self)

    monkeypatch.setattr(trainer.Trainer, "__init__", spy)
    source = velocity_model()
    reference = velocity_model()  # the same weights, never trained
    out = tmp_path / "run"
    finetune(source, data=small_data(), recipe="mf-rae-256", out=out, lr=1e-2, **TINY)
    assert [t.recipe.objective for t in built] == ["cmt", "mfd"]
    cmt, mfd = built
    assert cmt.recipe.loss == "mse" and mfd.recipe.loss == "mfrae" and mfd.recipe.derivative == "fd"
    assert cmt.recipe.time_shift == mfd.recipe.time_shift == 0.25  # sqrt(1 * 16 * 16 / 4096)
    stage1 = out / "stages" / "1-cmt"
    assert (stage1 / "config.json").is_file() and (out / "config.json").is_file()
    student = read_model_dir(stage1)  # the CMT export MFD started from
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.9, 0.6, 0.3, 0.1])
    y = torch.tensor([1, 2, 3, 10])
    with torch.no_grad():
        v_teacher = mfd.teacher(x, t, y)
        v_source = reference.velocity(x, t, y)
        u_diag = student(x, t, t, y)
    assert (v_teacher - v_source).abs().max() <= 1e-6
    assert (u_diag - v_source).abs().max() > 1e-3  # CMT changed the student: its diagonal is not the teacher
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["training"]["teacher"] == "the model passed in (in memory)"
    record = json.loads((out / "recipe.json").read_text())
    assert record["recipe"] == "mf-rae-256" and [s["stage"] for s in record["stages"]] == ["cmt", "mfd"]
    assert record["stages"][0]["origins"]["loss"].startswith("recipe mf-rae-256, stage cmt")


def test_resume_refuses_a_changed_setting_and_continues_the_recorded_run(tmp_path):
    from flowmap_convert.cli import app
    from flowmap_convert.io import export

    export(velocity_model(), tmp_path / "base")
    import numpy as np

    x, y = small_data()
    np.savez(tmp_path / "d.npz", latents=x.numpy(), labels=y.numpy())
    out = tmp_path / "run"
    common = ["--device", "cpu", "--threads", "1", "--out", str(out)]
    first = ["finetune", str(tmp_path / "base"), "--data", str(tmp_path / "d.npz"), "--batch-size", "2"]
    r = CliRunner().invoke(app, [*first, "--steps", "1", "--lr", "1e-3", "--log-every", "1", *common])
    assert r.exit_code == 0, r.output
    for extra, needle in [
        (["--lr", "5e-3"], "`--lr` was 0.001, now 0.005"),
        (["--seed", "3"], "`--seed` was 0, now 3"),
        (["--objective", "mft"], "`--objective` was dmf, now mft"),
        (["--loss", "mse"], "`--loss` was adaptive, now mse"),
        (["--depth", "1"], "`--depth` was None, now 1"),
    ]:
        r = CliRunner().invoke(app, ["finetune", "--resume", "--steps", "2", *extra, *common])
        line = r.output.strip().splitlines()[-1]
        assert r.exit_code == 2 and needle.replace("`", "") in line, r.output
    r = CliRunner().invoke(app, ["finetune", str(tmp_path / "other"), "--resume", *common])
    assert r.exit_code == 2 and "MODEL was" in r.output
    r = CliRunner().invoke(app, ["finetune", "--resume", "--steps", "2", *common])  # longer: allowed
    assert r.exit_code == 0, r.output
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert steps == [1, 2]
    assert json.loads((out / "config.json").read_text())["training"]["recipe"]["lr"] == 1e-3


@pytest.mark.parametrize("flag", ["--steps", "--batch-size", "--global-batch", "--grad-accum"])
def test_zero_counts_are_refused_not_read_as_defaults(tmp_path, flag):
    from flowmap_convert.cli import app

    out = tmp_path / "o"
    r = CliRunner().invoke(app, ["finetune", flag, "0", "--out", str(out), "--device", "cpu"])
    assert r.exit_code == 2 and f"{flag} must be an integer >= 1, got 0." in r.output, r.output
    assert not out.exists()


def test_qk_norm_is_added_and_the_export_keeps_the_recipes_shift(tmp_path):
    from flowmap_convert.finetuning import finetune
    from flowmap_convert.model import read_model_dir

    out = tmp_path / "run"
    finetune(
        velocity_model(), data=small_data(), out=out, qk_norm=True, sample_shift=1.5, steps=1, batch_size=2,
        progress=False, grid=False,
    )  # fmt: skip
    m = read_model_dir(out)
    assert m.config.qk_norm == "rms" and m.config.sampling["shift"] == 1.5
    assert any(k.endswith("attn.q_norm.scale") for k in m.state_dict())


def test_cmt_draws_cmt_pairs_rows_per_trajectory():
    from flowmap_convert.finetuning.cmt import cmt_loss
    from flowmap_convert.finetuning.common import Calls, Context
    from flowmap_convert.finetuning.recipe import Recipe

    model = velocity_model().with_depth(2)
    seen = []

    class Probe(Calls):
        def u(self, x, t, r, y):
            seen.append(x.shape[0])
            return super().u(x, t, r, y)

    rec = Recipe(objective="cmt", loss="mse", label_dropout=0.0, cmt_states=4, cmt_pairs=5, time_shift=1.0)
    ctx = Context(Probe(model), rec, 10, velocity_model().velocity)
    x0, y = small_data(3)
    cmt_loss(ctx, x0, y, torch.Generator().manual_seed(0))
    assert seen == [15]  # 3 trajectories x 5 pairs


# ---------------------------------------------------------------------------------------------------- generated options
def test_a_new_field_is_a_new_option_with_its_default_and_help(monkeypatch):
    """Adding an option is one edit: a field in the declaration shows up in --help with its default and help."""
    import typer

    from flowmap_convert.options import from_cli, option, with_options

    @dataclass(frozen=True)
    class Knobs:
        wobble_factor: float = option(0.25, "How much to wobble the frobnicator.", lo=0.0)
        nfe: int = option(1, concept="nfe", lo=1)

    got = {}

    @with_options((Knobs, {}))
    def cmd(**options):
        got.update(from_cli(Knobs, options))

    app = typer.Typer()
    app.command()(cmd)
    r = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    row = next(line for line in r.output.splitlines() if "--wobble-factor" in line)
    assert "How much to wobble the frobnicator." in row and "0.25" in row
    assert "Network evaluations per sample." in r.output  # a shared concept's help from vocabulary.SHARED
    assert CliRunner().invoke(app, ["--wobble-factor", "0.5"]).exit_code == 0 and got["wobble_factor"] == 0.5


@pytest.mark.parametrize(
    "command, flags",
    [
        ("finetune", ["--mg-scale", "--guidance-interval", "--recipe", "--teacher", "--qk-norm", "--lr", "--ema"]),
        ("sample", ["--nfe", "--guidance-interval", "--cfg-scale", "--num-samples", "--chunk-size", "--npz"]),
    ],
)
def test_the_commands_options_are_the_declarations(command, flags):
    from flowmap_convert.cli import app
    from flowmap_convert.finetuning.recipe import Recipe
    from flowmap_convert.options import flags as declared_flags
    from flowmap_convert.sample_options import SampleRun, SampleSettings

    r = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "250"})
    assert r.exit_code == 0
    for f in flags:
        assert f in r.output
    classes = (Recipe,) if command == "finetune" else (SampleSettings, SampleRun)
    for cls in classes:
        for flag in declared_flags(cls).values():
            assert flag in r.output, flag
    if command == "sample":
        assert "--guidance-low" not in r.output and "flowmap-sample" in r.output


def test_a_staged_run_resumes_in_its_last_stage(tmp_path):
    """A finished stage is not trained again on --resume; the stage with checkpoints continues."""
    from flowmap_convert.finetuning import finetune

    out = tmp_path / "run"
    kw = dict(data=small_data(), recipe="mf-rae-256", out=out, **{**TINY, "steps": 1})
    finetune(velocity_model(), **kw)
    stage1 = (out / "stages" / "1-cmt" / "metrics.jsonl").read_text()
    finetune(velocity_model(), resume=True, **{**kw, "steps": 2})
    assert (out / "stages" / "1-cmt" / "metrics.jsonl").read_text() == stage1  # CMT not trained again
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2]  # MFD continued
    with pytest.raises(FlowmapError, match="`stages` were cmt,mfd, now cmt,mfd,mft"):
        finetune(velocity_model(), resume=True, stages="cmt,mfd,mft", **kw)
