"""Model cards (README.md) for exported flow maps."""

from __future__ import annotations

import html
import re
from pathlib import Path
from urllib.parse import quote

from .config import ModelConfig


def code_span(value) -> str:
    """`value` as one Markdown code span that shows it literally: a fence longer than any backtick run inside, no
    line breaks, `|` escaped for table cells (a source name like ``a`b<script>`` cannot end the span or inject HTML)."""
    text = " ".join(str(value).split()).replace("|", "\\|")
    fence = "`" * (1 + max((len(r) for r in re.findall(r"`+", text)), default=0))
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def plain(value) -> str:
    """`value` as Markdown text: HTML escaped, Markdown punctuation backslash-escaped, one line."""
    text = html.escape(" ".join(str(value).split()), quote=False)
    return re.sub(r"([\\`*_\[\]|#!])", r"\\\1", text)


def describe_family(prov: dict) -> str:
    """The family line of a model's provenance, saying what an exported (`flowmap`) model is."""
    family = plain(prov.get("family") or "?")
    if prov.get("description"):
        return f"{family} ({plain(prov['description'])})"
    if family == "flowmap" and prov.get("source_family"):
        return f"flowmap (exported by flowmap from a {plain(prov['source_family'])} checkpoint)"
    if family == "flowmap":
        return "flowmap (a model exported by flowmap)"
    return family


def model_card(
    cfg: ModelConfig,
    probes: str | None = None,
    has_grid: bool = False,
    repo_id: str | None = None,
    figures: list[str] | tuple[str, ...] = (),
    grid_nfe: tuple[int, ...] = (1, 2),
) -> str:
    """A Hub-style model card: front matter, what the model is, how it was made, how to sample it.

    `repo_id` puts the Hub id into the sampling command; `figures` are extra images in the model directory;
    a fine-tuned model's grid (has_grid) has one row per NFE in `grid_nfe` and one column per class.
    """
    prov = cfg.provenance or {}
    lines = [
        "---",
        "library_name: flowmap-convert",
        "tags: [flow-map, meanflow, decoupled-meanflow]",
        "---",
        "",
        f"# Flow map from {code_span(prov.get('source', 'unknown source'))}",
        "",
    ]
    if cfg.conditioning == "decoupled" and cfg.depth == cfg.num_blocks:
        head = "the DDT head (with the time injected into its conditioning)" if cfg.arch == "ddt" else "the head"
        lines.append(
            f"A decoupled flow map (Decoupled MeanFlow, arXiv 2510.24474): all {cfg.num_blocks} blocks see the current time t, "
            f"{head} sees the next time r. At r = t it returns the source velocity."
        )
    elif cfg.conditioning == "decoupled":
        lines.append(
            f"A decoupled flow map (Decoupled MeanFlow, arXiv 2510.24474): blocks 0..{cfg.depth - 1} see the current time t, "
            f"blocks {cfg.depth}..{cfg.num_blocks - 1} and the head see the next time r. At r = t it returns the source velocity."
        )
    elif cfg.conditioning == "meanflow":
        lines.append("A MeanFlow model (MF-RAE, arXiv 2511.13019) with an embedder of t - r.")
    else:
        lines.append("A base flow model (velocity field) in flowmap's canonical convention.")
    lines += [
        "",
        "| field | value |",
        "|---|---|",
        f"| architecture | {cfg.arch}, hidden {cfg.hidden_size}, {cfg.num_blocks} blocks, {cfg.num_heads} heads, patch {cfg.patch_size} |",
        f"| input | {cfg.in_channels} x {cfg.input_size} x {cfg.input_size} ({cfg.latent.kind} latent space) |",
        f"| classes | {cfg.num_classes} (null label {cfg.num_classes}) |",
        f"| depth | {cfg.depth if cfg.depth is not None else '-'} |",
        f"| source convention | {cfg.time_convention}{' (DiT epsilon prediction at the DDPM step with the same SNR)' if cfg.time_convention == 'ddpm-eps' else ''} |",
    ]
    if cfg.latent.repo:
        where = cfg.latent.extra.get("decoder") or cfg.latent.extra.get("subfolder")
        lines.append(f"| latent decoder | {code_span(cfg.latent.repo)}{f' {code_span(where)}' if where else ''} |")
    for key in ("source", "revision", "file", "sha256", "weights", "family", "flowmap_version"):
        if key == "family" and key in prov:
            lines.append(f"| family | {describe_family(prov)} |")
        elif key in prov:
            lines.append(f"| {key} | {code_span(prov[key])} |")
    if cfg.training:
        import json

        body = json.dumps(cfg.training, indent=2, sort_keys=True)
        fence = "`" * max(3, 1 + max((len(r) for r in re.findall(r"`+", body)), default=0))
        lines += ["", "## Training recipe", "", f"{fence}json", body, fence]
    if has_grid:
        k = min(10, cfg.num_classes)
        rows = " and ".join(str(n) for n in grid_nfe)
        lines += [
            "",
            "## Samples",
            "",
            "![samples](grid.png)",
            "",
            f"Rows: {rows} network evaluations (Euler, seed 0); columns: classes 0..{k - 1}, one sample each.",
        ]
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"![{plain(Path(f).stem)}]({quote(str(f))})" for f in figures]
    if probes:
        lines += ["", "## Probe results", "", probes]
    lines += [
        "",
        "## Use",
        "",
        "```bash",
        f"flowmap sample {repo_id or 'PATH_OR_REPO'} --nfe 1 --out samples/",
        "```",
        "",
        "Convention: t = 1 is noise, t = 0 is data, x_t = (1 - t) x0 + t eps, x_r = x_t + (r - t) u(x_t, t, r).",
        "",
    ]
    return "\n".join(lines)
