"""DiT (original and diffusers): SNR-matched eps -> velocity conversion, r = t equivalence, strict loading, detection."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import tiny_config, tiny_vae
from dit_reference import make_sd
from flowmap_convert.adapters import FAMILIES, LoadOptions
from flowmap_convert.adapters.dit import (
    DiTFamily,
    diffusers_to_canonical,
    is_diffusers_dir,
    load_diffusers_dir,
    read_diffusers_dir,
)
from reference_models import alpha_bar_at, dit_eps, tau_of
from torch import nn

from flowmap_convert.ddpm import covered_range, default_schedule
from flowmap_convert.errors import FlowmapError
from flowmap_convert.model import FlowMap

TOL = 1e-5  # fp32, absolute (docs/conventions.md: the r = t invariant)


def random_dit_sd(c=4, d=32, n=3, p=2, grid=4, rows=11, seed=0) -> dict:
    """A tiny original-layout DiT state dict with learn_sigma (2C outputs) and random values everywhere."""
    return make_sd(d, n, c, p, size=grid * p, classes=rows - 1, learn_sigma=True, seed=seed, std=0.1)


def reference_velocity(eps: torch.Tensor, x_s: torch.Tensor, s: float) -> torch.Tensor:
    """The documented conversion inside the covered range: v = eps - x0 = (eps - x_s) / (1 - s)."""
    return (eps.double() - x_s.double()) / (1 - s)


# ------------------------------------------------------------------------------------------------ analytic oracle
class GaussianOracle(nn.Module):
    """A 'network' returning the analytic DDPM eps for x0 ~ N(mu, sigma^2 I) at its (continuous) DDPM step."""

    def __init__(self, mu: float, sigma: float):
        super().__init__()
        self.mu, self.sigma = mu, sigma
        self.dummy = nn.Parameter(torch.zeros(1))
        self.seen = []

    def encode(self, x, tau_t, y, depth):
        return x, tau_t

    def decode(self, h, tau_r, y, depth):
        x, tau_t = h
        self.seen.append((tau_t.clone(), tau_r.clone()))
        ab = torch.from_numpy(alpha_bar_at(tau_t.double().numpy())).reshape(-1, 1, 1, 1)
        # x = sqrt(ab) x0 + sqrt(1 - ab) eps  =>  E[eps | x] = sqrt(1-ab) (x - sqrt(ab) mu) / (ab sigma^2 + 1 - ab)
        eps = torch.sqrt(1 - ab) * (x.double() - torch.sqrt(ab) * self.mu) / (ab * self.sigma**2 + 1 - ab)
        return torch.cat([eps, torch.zeros_like(eps)], 1).to(x.dtype)


def analytic_flow_velocity(x_s: torch.Tensor, s: torch.Tensor, mu: float, sigma: float) -> torch.Tensor:
    """E[eps - x0 | x_s] for x_s = (1 - s) x0 + s eps, x0 ~ N(mu, sigma^2), eps ~ N(0, 1) (Gaussian conditioning)."""
    s = s.double().reshape(-1, 1, 1, 1)
    var = (1 - s) ** 2 * sigma**2 + s**2
    resid = x_s.double() - (1 - s) * mu
    e_eps = s * resid / var
    e_x0 = mu + (1 - s) * sigma**2 * resid / var
    return e_eps - e_x0


def oracle_model(mu=0.7, sigma=0.5):
    model = FlowMap(tiny_config(in_channels=1, learn_sigma=True, time_convention="ddpm-eps"))
    model.net = GaussianOracle(mu, sigma)
    return model


def test_covered_range_matches_the_schedule():
    lo, hi = covered_range()
    assert abs(lo - 0.0099) < 1e-4 and abs(hi - 0.9937) < 1e-4  # DiT's 1000 linear betas (docs/conventions.md)
    sch = default_schedule()
    for k in (0, 1, 17, 500, 998, 999):
        s = torch.tensor([tau_s := 1.0 / (1.0 + math.exp(sch.log_snr[k].item() / 2))], dtype=torch.float64)
        assert abs(sch.ddpm_time(s).item() - k) < 1e-6, (k, tau_s)
    s = torch.tensor([0.05, 0.3, 0.5, 0.77, 0.98], dtype=torch.float64)
    assert np.allclose(sch.ddpm_time(s).numpy(), [tau_of(v) for v in s.tolist()], atol=1e-6)


def test_oracle_velocity_is_the_analytic_flow_velocity_inside_the_covered_range():
    model = oracle_model()
    lo, hi = covered_range()
    s = torch.tensor(np.linspace(lo, hi, 41), dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(41, 1, 16, 16, generator=g, dtype=torch.float64) * 1.3 + 0.2
    # times travel as float32 through FlowMap: compare against the analytic answer at the same float32 times
    s32 = s.float()
    v = model(x, s32, s32, torch.zeros(41, dtype=torch.long))
    ref = analytic_flow_velocity(x, s32, 0.7, 0.5)
    assert v.dtype == torch.float64
    assert (v - ref).abs().max().item() < 1e-5 * (1 + ref.abs().max().item())


def test_oracle_at_the_ends_of_the_schedule_stays_finite_and_close():
    model = oracle_model()
    lo, hi = covered_range()
    s = torch.tensor([0.0, 1e-4, lo / 2, lo, hi, (hi + 1) / 2, 0.999, 1.0], dtype=torch.float32)
    x = torch.randn(len(s), 1, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    v = model(x, s, s, torch.zeros(len(s), dtype=torch.long))
    ref = analytic_flow_velocity(x, s, 0.7, 0.5)
    assert torch.isfinite(v).all()
    err = (v - ref).abs().amax(dim=(1, 2, 3))
    # exact at the two covered end points; outside, the clamped step costs at most the SNR gap, not a blow-up
    assert err[3] < 1e-4 and err[4] < 1e-4
    # below s_min the only error is the eps the network gives at its cleanest step (ab_0 = 0.9999):
    # |eps(x, ab_0)| <= sqrt(1 - ab_0) |x - mu| / (ab_0 sigma^2 + 1 - ab_0) ~ 0.04 |x - mu|; the x0 algebra is exact
    bound_low = 0.05 * (x[:3] - 0.7).abs().amax(dim=(1, 2, 3))
    assert (err[:3] <= bound_low).all(), (err, bound_low)
    assert err[5:].max() < 0.01, err  # above s_max: x0 from DDPM step 999 (sqrt(ab) = 0.0064), no 1/(1-s) blow-up
    tau_t, _ = model.net.seen[-1]
    assert tau_t.min().item() == 0.0 and tau_t.max().item() == 999.0  # clamped DDPM steps


def test_decoupled_ddpm_times_reach_the_right_blocks():
    model = oracle_model().with_depth(3)
    x = torch.randn(2, 1, 16, 16)
    model(x, torch.tensor([0.8, 0.4]), torch.tensor([0.3, 0.1]), torch.tensor([0, 1]))
    tau_t, tau_r = model.net.seen[-1]
    assert np.allclose(tau_t.numpy(), [tau_of(0.8), tau_of(0.4)], atol=1e-3)
    assert np.allclose(tau_r.numpy(), [tau_of(0.3), tau_of(0.1)], atol=1e-3)


# ------------------------------------------------------------------------------------------------ original layout
def test_original_dit_matches_the_reference_forward_at_every_depth():
    sd = random_dit_sd()
    model = DiTFamily().build(sd, LoadOptions(num_heads=4))
    cfg = model.config
    assert cfg.time_convention == "ddpm-eps" and cfg.learn_sigma and cfg.input_size == 8 and cfg.num_classes == 10
    assert cfg.latent.kind == "sd-vae" and cfg.latent.scale == 0.18215
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 8, 8, generator=g)
    y = torch.tensor([1, 5, 10])
    sch = default_schedule()
    # canonical times whose DDPM step is an integer (10, 250, 700) plus continuous ones
    s_int = [1.0 / (1.0 + math.exp(sch.log_snr[k].item() / 2)) for k in (10, 250, 700)]
    for s_list in (s_int, [0.05, 0.42, 0.9]):
        s = torch.tensor(s_list)
        tau = torch.tensor([tau_of(v) for v in s.tolist()], dtype=torch.float32)
        x_ddpm = x / torch.sqrt((1 - s) ** 2 + s**2).reshape(-1, 1, 1, 1)
        eps = dit_eps(sd, x_ddpm, [tau] * 3, tau, y, heads=4)[:, :4]
        ref = torch.stack([reference_velocity(eps[i], x[i], float(s[i])) for i in range(3)])
        for depth in (1, 2, 3):
            u = model.with_depth(depth)(x, s, s, y)
            assert (u.double() - ref).abs().max().item() <= TOL, depth
        assert (model.velocity(x, s, y).double() - ref).abs().max().item() <= TOL


def test_original_dit_decoupled_forward_uses_t_then_r():
    sd = random_dit_sd(seed=4)
    model = DiTFamily().build(sd, LoadOptions(num_heads=4)).with_depth(2)
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 4])
    t, r = torch.tensor([0.7, 0.5]), torch.tensor([0.2, 0.45])
    tt = torch.tensor([tau_of(v) for v in t.tolist()])
    tr = torch.tensor([tau_of(v) for v in r.tolist()])
    x_ddpm = x / torch.sqrt((1 - t) ** 2 + t**2).reshape(-1, 1, 1, 1)
    eps = dit_eps(sd, x_ddpm, [tt, tt, tr], tr, y, heads=4)[:, :4]
    ref = torch.stack([reference_velocity(eps[i], x[i], float(t[i])) for i in range(2)])
    assert (model(x, t, r, y).double() - ref).abs().max().item() <= TOL


def test_original_dit_loading_is_strict_and_shape_checked():
    sd = random_dit_sd()
    bad = dict(sd)
    bad.pop("blocks.1.mlp.fc2.bias")
    with pytest.raises(FlowmapError, match="missing: blocks.1.mlp.fc2.bias"):
        DiTFamily().build(bad, LoadOptions(num_heads=4))
    bad = dict(sd, **{"blocks.0.attn.proj.weight": torch.zeros(32, 31)})
    with pytest.raises(FlowmapError, match="shape mismatch"):
        DiTFamily().build(bad, LoadOptions(num_heads=4))
    with pytest.raises(FlowmapError, match="not divisible"):
        DiTFamily().build(sd, LoadOptions(num_heads=5))


def test_detection_dit_vs_sit_needs_a_hint():
    from flowmap_convert.adapters import choose_family

    sd = random_dit_sd()
    assert FAMILIES["dit"].detect(sd) and FAMILIES["sit"].detect(sd)  # identical keys (docs/checkpoints.md)
    assert choose_family(sd, {"name": "DiT-XL-2-256x256.pt"})[0] == "dit"
    assert choose_family(sd, {"name": "SiT-XL-2-256x256.pt"})[0] == "sit"
    assert choose_family(sd, {"args": {"model": "DiT-XL/2"}})[0] == "dit"
    with pytest.raises(FlowmapError, match="`family`"):
        choose_family(sd, {"name": "model.pt"})
    assert not FAMILIES["dit"].detect({k: v for k, v in sd.items() if not k.startswith("final_layer.linear")})


# ------------------------------------------------------------------------------------------------ diffusers layout
def save_diffusers_dit(root, num_layers: int = 3):
    """A tiny random DiTTransformer2DModel + AutoencoderKL saved in the facebook/DiT-XL-2-256 layout."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    tr = diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=num_layers,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
    )
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in tr.named_parameters():
            if "class_embedder" in name or "timestep_embedder" in name:
                continue
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        # one shared embedder, copied into every block as the conversion script does
        blocks = tr.transformer_blocks
        for p in blocks[0].norm1.emb.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for blk in blocks[1:]:
            blk.norm1.emb.load_state_dict(blocks[0].norm1.emb.state_dict())
    tr.save_pretrained(root / "transformer")
    tiny_vae().save_pretrained(root / "vae")
    (root / "model_index.json").write_text('{"_class_name": "DiTPipeline"}')
    return tr.eval()


@pytest.fixture(scope="module")
def diffusers_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit-diffusers")
    return root, save_diffusers_dit(root)


def test_diffusers_dit_equals_diffusers_and_the_reference(diffusers_repo):
    root, tr = diffusers_repo
    assert is_diffusers_dir(root) and is_diffusers_dir(root / "transformer")
    model = load_diffusers_dir(root)
    cfg = model.config
    assert (
        cfg.extra["freq_shift"] == 1 and cfg.extra["norm2_eps"] == 1e-5 and cfg.num_heads == 2 and cfg.input_size == 8
    )
    assert cfg.latent.repo == str(root) and cfg.latent.extra == {"subfolder": "vae"}
    sd, _ = read_diffusers_dir(root)
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([0, 9, 10])
    tau = torch.tensor([0.0, 311.0, 999.0])
    with torch.no_grad():
        ours = model.net.decode(model.net.encode(x, tau, y, 3), tau, y, 3)
        theirs = tr(x, timestep=tau, class_labels=y).sample
        ref = dit_eps(sd, x, [tau] * 3, tau, y, heads=2, layout="diffusers")
    assert (ours - theirs).abs().max().item() < 1e-5
    assert (ours - ref).abs().max().item() < 1e-5
    # the canonical velocity at r = t, every depth, against the reference + documented conversion
    s = torch.tensor([0.1, 0.5, 0.85])
    tau_s = torch.tensor([tau_of(v) for v in s.tolist()])
    x_ddpm = x / torch.sqrt((1 - s) ** 2 + s**2).reshape(-1, 1, 1, 1)
    eps = dit_eps(sd, x_ddpm, [tau_s] * 3, tau_s, y, heads=2, layout="diffusers")[:, :4]
    vref = torch.stack([reference_velocity(eps[i], x[i], float(s[i])) for i in range(3)])
    for depth in (1, 2, 3):
        u = model.with_depth(depth)(x, s, s, y)
        assert (u.double() - vref).abs().max().item() <= TOL


def test_diffusers_keys_map_to_canonical_and_detect(diffusers_repo):
    root, _ = diffusers_repo
    sd, _ = read_diffusers_dir(root)
    assert FAMILIES["dit"].detect(sd)
    canon = diffusers_to_canonical(sd)
    assert "blocks.2.attn.qkv.weight" in canon and canon["blocks.2.attn.qkv.weight"].shape == (96, 32)
    assert "t_embedder.mlp.0.weight" in canon and not any(k.startswith("transformer_blocks") for k in canon)
    bad = dict(sd)
    key = "transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"
    bad[key] = bad[key] + 1
    with pytest.raises(FlowmapError, match="different copies"):
        diffusers_to_canonical(bad)


def test_diffusers_bin_weights_and_claimed_hub_layout(diffusers_repo, tmp_path):
    import shutil

    from safetensors.torch import load_file

    root, _ = diffusers_repo
    (tmp_path / "transformer").mkdir()
    shutil.copy(root / "transformer" / "config.json", tmp_path / "transformer" / "config.json")
    sd = load_file(str(root / "transformer" / "diffusion_pytorch_model.safetensors"))
    torch.save(sd, tmp_path / "transformer" / "diffusion_pytorch_model.bin")  # main branch of facebook/DiT-XL-2-256
    fam = FAMILIES["dit"]
    assert fam.claims_dir(tmp_path) and fam.claims_dir(root)
    model, used = fam.build_dir(tmp_path, LoadOptions())
    assert used == "transformer/diffusion_pytorch_model.bin"
    ref = load_diffusers_dir(root)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.8]), torch.tensor([1, 2])
    assert torch.equal(model.velocity(x, t, y), ref.velocity(x, t, y))
    files = [
        "model_index.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.bin",
        "vae/config.json",
        "vae/diffusion_pytorch_model.bin",
        "vae/diffusion_pytorch_model.safetensors",
        "README.md",
    ]
    assert fam.claims_layout(files) == [
        "model_index.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.bin",
        "vae/diffusion_pytorch_model.safetensors",
        "vae/config.json",
    ]
    assert fam.claims_layout(["model.pt", "README.md"]) is None


# ------------------------------------------------------------------------------------------------ DDPM step precision
@pytest.mark.parametrize("step, tol", [(0, 1e-5), (10, 1e-5), (400, 1e-5), (900, 1e-5), (999, 1e-4)])
def test_r_equals_t_matches_the_source_fed_its_integer_ddpm_step(step, tol):
    """u(x_s, s, s) against the source's own forward at DDPM step k and the matching x, s = s_k in float64.

    The time embedding is made steep (first time-MLP layer x30, as in trained DiTs), so a canonical time rounded
    to float32 (about 2e-5 of a step at k = 400, 1e-4 at k = 999) shows up in u; a float64 time reaches step k.
    """
    sd = random_dit_sd(seed=11)
    sd["t_embedder.mlp.0.weight"] = sd["t_embedder.mlp.0.weight"] * 30
    model = DiTFamily().build(sd, LoadOptions(num_heads=4))
    lam = default_schedule().log_snr[step]
    s = torch.sigmoid(-lam / 2).reshape(1).repeat(2)  # float64: log-SNR(s) = 2 log((1 - s)/s) = lambda_k
    n = torch.sqrt((1 - s) ** 2 + s**2).reshape(-1, 1, 1, 1)
    x_s = (n * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).double()).float()
    x_ddpm = (x_s.double() / n).float()  # the matching DDPM input, x_s / n(s)
    y, tau = torch.tensor([1, 10]), torch.full((2,), float(step))
    eps = dit_eps(sd, x_ddpm, [tau] * 3, tau, y, heads=4)[:, :4].double()
    ab = torch.sigmoid(lam)  # alpha_bar_k
    x0 = (x_ddpm.double() - torch.sqrt(1 - ab) * eps) / torch.sqrt(ab)
    v = eps - x0  # the source's velocity at its own step
    with torch.no_grad():
        u = model(x_s, s, s, y).double()
    assert (u - v).abs().max().item() <= tol * v.abs().max().item()


def test_diffusers_dit_decoder_only_u_and_dudt_equal_the_full_model(diffusers_repo):
    from torch.func import jvp

    from flowmap_convert.finetuning.common import Calls

    model = load_diffusers_dir(diffusers_repo[0]).with_depth(2).eval()
    g = torch.Generator().manual_seed(8)
    x, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t, r, y = torch.tensor([0.8, 0.3]), torch.tensor([0.1, 0.3]), torch.tensor([2, 10])
    u_ref, dudt_ref = jvp(lambda x_, t_: model(x_, t_, r, y), (x, t), (v, torch.ones(2)))
    u, dudt = Calls(model, decoder_only=True).u_and_dudt_jvp(x, t, r, y, v)
    assert (u - u_ref).abs().max().item() <= 1e-6
    assert (dudt - dudt_ref).abs().max().item() <= 1e-5 * max(1.0, dudt_ref.abs().max().item())
