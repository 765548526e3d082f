"""DiT family (docs/checkpoints.md): original `.pt` state dicts and diffusers-format repos, both epsilon-prediction DDPM.

Both become a `dit` backbone with `time_convention="ddpm-eps"`: the FlowMap boundary maps canonical t to the DDPM
step with the same signal-to-noise ratio and turns epsilon into v = eps - x0 (flowmap_convert/ddpm.py).
Diffusers weights are renamed to the canonical DiT keys; their timestep embedding (f_k = exp(-ln(1e4) k / 127))
and block norm2 eps (1e-5) are kept exactly through `config.extra = {"freq_shift": 1, "norm2_eps": 1e-5}`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch

from ..config import SD_VAE_SCALE, LatentSpace, ModelConfig
from ..errors import FlowmapError
from ..layers import sincos_pos_embed_2d
from . import register
from .dit_keys import NOT_DIT, build_and_load, infer_dit_config
from .interface import NO_OPTIONS, Family, LoadOptions, Meta, StateDict

DIFFUSERS_PREFIX = "transformer_blocks."
_DIFF_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
# Original DiT release file names (docs/checkpoints.md): indistinguishable from original SiT by keys, so named hints decide.
NAME_HINT = re.compile(r"(^|/)DiT-(XL|L|B|S)-\d+-\d+x\d+\.pt$", re.IGNORECASE)


def is_diffusers_dit(sd: dict) -> bool:
    """True for a diffusers DiTTransformer2DModel state dict (diffusers key names)."""
    return "proj_out_2.weight" in sd and f"{DIFFUSERS_PREFIX}0.norm1.emb.timestep_embedder.linear_1.weight" in sd


def is_original_dit(sd: dict) -> bool:
    """True for a DiT-layout state dict with a learn_sigma head (2C outputs) and no REPA/DMF extras."""
    need = (
        "x_embedder.proj.weight",
        "t_embedder.mlp.0.weight",
        "y_embedder.embedding_table.weight",
        "final_layer.linear.weight",
        "pos_embed",
    )
    if not all(k in sd for k in need):
        return False
    if any(k.startswith(("projectors.", "logvar_linear.")) or ".q_norm." in k for k in sd):
        return False
    if any(k in sd for k in NOT_DIT):  # LightningDiT / REPA-E keys (their own adapters)
        return False
    c, p = sd["x_embedder.proj.weight"].shape[1], sd["x_embedder.proj.weight"].shape[2]
    return sd["final_layer.linear.weight"].shape[0] == p * p * 2 * c


def diffusers_to_canonical(sd: dict) -> dict[str, torch.Tensor]:
    """Rename diffusers DiT keys to the canonical DiT keys (the inverse of diffusers' DiT conversion; the key map is in docs/checkpoints.md).

    The timestep and class embedders are copied into every block in diffusers; block 0's copy is taken after
    checking that all copies are equal (the final layer uses block 0's, docs/checkpoints.md).
    """
    out: dict[str, torch.Tensor] = {}
    shared: dict[str, torch.Tensor] = {}
    emb_map = {
        "norm1.emb.timestep_embedder.linear_1.weight": "t_embedder.mlp.0.weight",
        "norm1.emb.timestep_embedder.linear_1.bias": "t_embedder.mlp.0.bias",
        "norm1.emb.timestep_embedder.linear_2.weight": "t_embedder.mlp.2.weight",
        "norm1.emb.timestep_embedder.linear_2.bias": "t_embedder.mlp.2.bias",
        "norm1.emb.class_embedder.embedding_table.weight": "y_embedder.embedding_table.weight",
    }
    block_map = {
        "norm1.linear.weight": "adaLN_modulation.1.weight",
        "norm1.linear.bias": "adaLN_modulation.1.bias",
        "attn1.to_out.0.weight": "attn.proj.weight",
        "attn1.to_out.0.bias": "attn.proj.bias",
        "ff.net.0.proj.weight": "mlp.fc1.weight",
        "ff.net.0.proj.bias": "mlp.fc1.bias",
        "ff.net.2.weight": "mlp.fc2.weight",
        "ff.net.2.bias": "mlp.fc2.bias",
    }
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, val in sd.items():
        m = _DIFF_BLOCK.match(key)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            if rest in emb_map:
                canon = emb_map[rest]
                if canon in shared:
                    if not torch.equal(shared[canon], val):
                        raise FlowmapError(
                            f"the diffusers DiT blocks carry different copies of {canon} (block {i} differs from block 0); this is not a converted DiT checkpoint, pass `family` explicitly."
                        )
                else:
                    shared[canon] = val
            elif rest in block_map:
                out[f"blocks.{i}.{block_map[rest]}"] = val
            elif (mq := re.match(r"^attn1\.to_([qkv])\.(weight|bias)$", rest)) is not None:
                qkv.setdefault((i, mq.group(2)), {})[mq.group(1)] = val
            else:
                unknown.append(key)
        elif key.startswith("pos_embed.proj."):
            out["x_embedder.proj." + key.split(".")[-1]] = val
        elif key.startswith("proj_out_1."):
            out["final_layer.adaLN_modulation.1." + key.split(".")[-1]] = val
        elif key.startswith("proj_out_2."):
            out["final_layer.linear." + key.split(".")[-1]] = val
        elif key == "pos_embed.pos_embed":
            continue  # a recomputable sin-cos buffer when persistent; we rebuild the identical table
        else:
            unknown.append(key)
    if unknown:
        raise FlowmapError(
            f"unexpected keys in the diffusers DiT weights ({', '.join(sorted(unknown)[:4])}); this is not a DiTTransformer2DModel, pass `family` explicitly."
        )
    for (i, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise FlowmapError(
                f"diffusers DiT block {i} lacks some of to_q/to_k/to_v; the checkpoint is incomplete, re-download it."
            )
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0
        )  # q, k, v along dim 0
    out.update(shared)
    return out


def dit_config(sd: dict, options: LoadOptions, diffusers_config: dict | None = None) -> ModelConfig:
    """Architecture of a canonical-key DiT state dict: dit_keys.infer_dit_config (the one DiT inference), then
    the DiT specifics (DDPM epsilon convention, SD-VAE latents; diffusers: heads, classes and time shift from the
    transformer config)."""
    args, extra = {}, {}
    if diffusers_config is not None:
        if not options.num_heads and diffusers_config.get("num_attention_heads"):
            options = dataclasses.replace(options, num_heads=diffusers_config["num_attention_heads"])
        if diffusers_config.get("num_embeds_ada_norm"):
            args["num_classes"] = diffusers_config["num_embeds_ada_norm"]
        extra = {
            "freq_shift": 1,
            "norm2_eps": float(diffusers_config.get("norm_eps", 1e-5)),
            "source_layout": "diffusers",
        }
    fields = infer_dit_config(sd, options, args)
    size, c = fields["input_size"], fields["in_channels"]
    latent = LatentSpace(
        kind="sd-vae",
        channels=c,
        size=size,
        image_channels=3,
        image_size=size * 8,
        repo="stabilityai/sd-vae-ft-ema",
        scale=SD_VAE_SCALE,
    )
    fields.update(
        time_convention="ddpm-eps", conditioning="velocity", extra=extra, latent=latent, sampling={"cfg_scale": 1.0}
    )
    return ModelConfig(**fields)


def with_pos_embed(sd: dict, diffusers_config: dict | None) -> dict:
    """Diffusers weights lack `pos_embed`: a fixed sin-cos table of the config's sample_size (same formula, §1.4)."""
    if "pos_embed" in sd or diffusers_config is None:
        return sd
    size = diffusers_config.get("sample_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise FlowmapError("the diffusers transformer config has no sample_size; add it to transformer/config.json.")
    w = sd.get("x_embedder.proj.weight")
    if w is None or w.dim() != 4 or w.shape[2] < 1 or size % int(w.shape[2]):
        raise FlowmapError(
            "the diffusers DiT weights have no usable patch embedding for its sample_size; re-download the repo."
        )
    table = sincos_pos_embed_2d(int(w.shape[0]), size // int(w.shape[2]))
    return {**sd, "pos_embed": torch.from_numpy(table).float().unsqueeze(0)}


def build_dit(
    sd: dict,
    options: LoadOptions,
    diffusers_config: dict | None = None,
    latent_repo: tuple[str, str | None] | None = None,
):
    """FlowMap over a canonical-key DiT state dict, loaded strictly (pos_embed rebuilt for diffusers weights).

    `latent_repo`: (repo, subfolder) of the VAE when it is not stabilityai/sd-vae-ft-ema (a pipeline's own vae/).
    """
    sd = with_pos_embed(dict(sd), diffusers_config)
    cfg = dit_config(sd, options, diffusers_config)
    if latent_repo:
        sub = {"subfolder": latent_repo[1]} if latent_repo[1] else {}
        cfg = cfg.replace(latent=dataclasses.replace(cfg.latent, repo=latent_repo[0], extra=sub))
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    return build_and_load(fields, sd, options.what or "the DiT checkpoint")


@register("dit")
class DiTFamily(Family):
    """Original DiT `.pt` state dicts and diffusers DiTTransformer2DModel weights / pipeline directories."""

    tie_winner = False  # an original DiT file has exactly SiT's keys: the name, args or --family decide

    def detect(self, sd: StateDict) -> bool:
        """Diffusers DiT keys, or a DiT-layout state dict with a learn_sigma head (shared with original SiT)."""
        return is_diffusers_dit(sd) or is_original_dit(sd)

    def hint(self, meta: Meta) -> bool:
        """DiT release names (`DiT-XL-2-256x256.pt`), DiT training args (`model='DiT-XL/2'`) or diffusers weights."""
        args = meta.get("args") or {}
        if args:
            return str(args.get("model", "")).startswith("DiT-")
        name = str(meta.get("name", ""))
        return bool(NAME_HINT.search(name)) or name.startswith("diffusion_pytorch_model.")

    def build(self, sd: StateDict, options: LoadOptions = NO_OPTIONS):
        """FlowMap (ddpm-eps convention) from either layout; diffusers weights need their transformer config."""
        if is_diffusers_dit(sd):
            cfg = None
            if options.what:
                near = Path(options.what).parent / "config.json"  # transformer/config.json beside the weights
                cfg = json.loads(near.read_text()) if near.is_file() else None
            if cfg is None:
                raise FlowmapError(
                    "diffusers DiT weights need their transformer/config.json (sample_size, heads); pass the pipeline directory or the transformer/ folder instead of the weights file."
                )
            return build_dit(diffusers_to_canonical(sd), options, cfg)
        if not is_original_dit(sd):
            raise FlowmapError(
                "this checkpoint is not a DiT (x_embedder, blocks, final_layer with a 2C learn_sigma head); check `family`."
            )
        return build_dit(sd, options)

    def claims_dir(self, path: Path) -> bool:
        """A diffusers pipeline directory (or its transformer/ folder) whose transformer is a DiT."""
        folder = find_diffusers_transformer(path)
        if folder is None:
            return False
        try:
            cfg = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            return False
        return cfg.get("_class_name") in DIT_CLASSES or cfg.get("norm_type") == "ada_norm_zero"

    def build_dir(self, path: Path, options: LoadOptions):
        """(FlowMap, weights file used) from a diffusers DiT directory."""
        folder = find_diffusers_transformer(path)
        used = next(n for n in WEIGHT_NAMES if (folder / n).is_file())
        return load_diffusers_dir(path, options), f"{folder.name}/{used}"

    def claims_layout(self, files: list[str]) -> list[str] | None:
        """Hub download patterns for a diffusers DiT repo: model_index, transformer/ and vae/ (safetensors preferred)."""
        if "transformer/config.json" not in files:
            return None
        out = ["model_index.json", "transformer/config.json"]
        for sub in ("transformer", "vae"):
            names = [f"{sub}/{n}" for n in WEIGHT_NAMES if f"{sub}/{n}" in files]
            if sub == "transformer" and not names:
                return None
            out += names[:1]
            if sub == "vae" and names:
                out.append("vae/config.json")
        return out


# ---------------------------------------------------------------------------------------------- diffusers repos
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
DIT_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")  # older configs name the generic class
_SNAPSHOT = re.compile(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots[/\\][0-9a-f]{40}")


def hub_id_of(path: str | Path) -> str | None:
    """'owner/name' when `path` lies in a Hugging Face cache snapshot, else None (keeps exported configs portable)."""
    m = _SNAPSHOT.search(str(Path(path).resolve()))
    return f"{m.group(1)}/{m.group(2)}" if m else None


def find_diffusers_transformer(path: str | Path) -> Path | None:
    """The `transformer/` folder of a diffusers pipeline directory (or the folder itself), else None."""
    p = Path(path)
    for cand in (p / "transformer", p):
        if (cand / "config.json").is_file() and any((cand / n).is_file() for n in WEIGHT_NAMES):
            return cand
    return None


def is_diffusers_dir(path: str | Path) -> bool:
    """True for a diffusers pipeline directory (or its transformer sub-folder) holding DiT-like weights."""
    return find_diffusers_transformer(path) is not None


def read_diffusers_dir(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, transformer config) of a diffusers directory; safetensors preferred, .bin read weights-only."""
    folder = find_diffusers_transformer(path)
    if folder is None:
        raise FlowmapError(
            f"{path} is not a diffusers model directory (no transformer/config.json with diffusion_pytorch_model weights)."
        )
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except ValueError as e:
        raise FlowmapError(f"{folder / 'config.json'} is not valid JSON ({e}); re-download the repo.") from None
    st, binf = folder / WEIGHT_NAMES[0], folder / WEIGHT_NAMES[1]
    try:
        if st.is_file():
            from safetensors.torch import load_file

            sd = load_file(str(st))
        else:
            sd = torch.load(str(binf), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise FlowmapError(
            f"cannot read the weights in {folder} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); re-download the repo."
        ) from None
    if not isinstance(sd, dict):
        raise FlowmapError(f"{folder} weights are not a state dict; re-download the repo.")
    return sd, cfg


def load_diffusers_dir(path: str | Path, options: LoadOptions = NO_OPTIONS):
    """FlowMap from a diffusers DiT pipeline directory; the latent decoder is the repo's own `vae/` when present."""
    sd, cfg = read_diffusers_dir(path)
    if not is_diffusers_dit(sd):
        raise FlowmapError(
            f"{path} holds a diffusers model that is not a DiT transformer; flowmap reads DiTTransformer2DModel repos."
        )
    root = Path(path)
    vae = None
    if (root / "vae" / "config.json").is_file():
        vae = (options.vae_source or hub_id_of(root) or str(root.resolve()), "vae")
    opts = dataclasses.replace(options, what=str(find_diffusers_transformer(path)))
    model = build_dit(diffusers_to_canonical(sd), opts, cfg, latent_repo=vae)
    if vae:  # decoded image side from the VAE's own depth: 2^(len(block_out_channels) - 1) per latent pixel
        try:
            factor = 2 ** (
                len(json.loads((root / "vae" / "config.json").read_text()).get("block_out_channels", [0] * 4)) - 1
            )
        except (OSError, ValueError):
            factor = 8
        model.config = model.config.replace(
            latent=dataclasses.replace(model.config.latent, image_size=model.config.input_size * factor)
        )
    return model
