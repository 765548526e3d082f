"""Source adapters: resolve a source, read it safely, detect its family and build a canonical FlowMap.

Pipeline (docs/architecture.md): resolve -> download/cache -> read state dict safely -> detect family -> build -> load strictly.
`load_source(source, ...)` is the single entry point and returns `(model, info)`: `model` is a FlowMap in the
canonical convention (a base velocity model, or already a flow map for DMF / MF-RAE / exported sources) and
`info` its provenance (source, revision, file, sha256, weights, family).

A family is a class deriving from `interface.Family` and satisfying the `interface.FamilyAdapter` Protocol
(`detect`, `build`, and the optional `hint`, `accepts`, `tie_winner`, `claims_dir`, `build_dir`, `claims_layout`
with their defaults), registered with `@register("name")`; `DETECTION_ORDER` below lists every family once, in
the order detection tries them. `build` takes the `interface.LoadOptions` of the call.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from .. import _version  # a module on disk in flowmap_convert/ (adapters/ lives beside it: package-dir mapping)
from ..config import MAX_BLOCKS
from ..errors import FlowmapError
from ..io import ABSURD, check_tensor_dtypes, nonfinite_report, sha256_file
from ..model import read_model_dir
from ..outputs import is_model_dir
from .checkpoint import WEIGHT_SUFFIXES, read_checkpoint
from .interface import Family, FamilyAdapter, LoadOptions, Meta, StateDict

__all__ = ["DETECTION_ORDER", "FAMILIES", "Family", "FamilyAdapter", "LoadOptions", "load_source", "register"]

BUILTIN_DIR = Path(_version.__file__).resolve().parent / "builtin"
# The order detection tries the families in: more specific first (dmf's log-variance head before repa, repa's
# canonical head before sit / dit's learn_sigma one; MF-RAE's (t - r) embedder before RAE). A new family adds its
# name here, where it belongs in that order.
DETECTION_ORDER: tuple[str, ...] = ("dmf", "repa", "sit", "dit", "mf-rae", "rae", "ddt", "lightningdit", "repa-e")
FAMILIES: dict[str, FamilyAdapter] = {}


def register(name: str):
    """Class decorator adding a family adapter (an instance of the class) to the registry under `name`."""

    def deco(cls):
        adapter = cls()
        adapter.name = name
        if not isinstance(adapter, FamilyAdapter):
            missing = [m for m in ("detect", "build", *_OPTIONAL) if not hasattr(adapter, m)]
            raise TypeError(f"family {name!r} ({cls.__name__}) lacks {', '.join(missing)}; derive it from Family.")
        if name not in DETECTION_ORDER:
            raise TypeError(
                f"family {name!r} is not in adapters.DETECTION_ORDER; add it where detection should try it."
            )
        FAMILIES[name] = adapter
        return cls

    return deco


_OPTIONAL = ("hint", "accepts", "tie_winner", "claims_dir", "build_dir", "claims_layout")


def note(message: str) -> None:
    """A one-line note on stderr (what was picked, detected, dropped); stdout stays for results."""
    print(f"flowmap: {message}", file=sys.stderr, flush=True)


def builtin_models() -> list[str]:
    """Names of the builtin flow models (directories with a flowmap config.json; the digits classifier is not one)."""
    return sorted(d.name for d in BUILTIN_DIR.iterdir() if is_model_dir(d)) if BUILTIN_DIR.is_dir() else []


def builtin_path(name: str) -> Path:
    """Directory of a model shipped inside the package (`builtin:NAME`: a plain name from the builtin folder)."""
    if name == "digits-classifier":
        raise FlowmapError(
            "builtin:digits-classifier is the evaluation classifier for builtin:digits (accuracy and FID features), "
            "not a flow model; convert or sample builtin:digits-sit instead."
        )
    known = builtin_models()
    if name not in known:  # never a path: builtin:/etc and builtin:../x name no builtin model
        known = ", ".join(f"builtin:{n}" for n in known)
        raise FlowmapError(f"unknown builtin model {name!r}; available: {known or 'none'}.")
    return BUILTIN_DIR / name


def check_key_indices(sd: dict, what: str) -> None:
    """Refuse keys whose numeric parts are implausible (`blocks.1000000000.x`) in one pass over the keys."""
    for key in sd:
        if not isinstance(key, str):
            raise FlowmapError(f"{what} has a non-string key {key!r}; it is not a checkpoint of model weights.")
        for part in key.split("."):
            if part.isdigit() and (len(part) > 6 or int(part) >= MAX_BLOCKS):
                raise FlowmapError(
                    f"{what} has the key {key[:80]!r}, whose index {part[:12]} exceeds {MAX_BLOCKS - 1}; the file is damaged or not a supported model."
                )


def check_weights(model, what: str, allow_nonfinite: bool | None) -> None:
    """NaN / Inf weights: refused unless allowed (None: a warning only); absurd magnitudes: a warning."""
    named = ((k[len("net.") :] if k.startswith("net.") else k, v) for k, v in model.state_dict().items())
    bad, huge = nonfinite_report(named)  # names as in the checkpoint (no `net.`)
    if bad:
        names = ", ".join(bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")
        if allow_nonfinite is False:
            raise FlowmapError(
                f"{what} has NaN or infinite weights in {names}; the checkpoint is damaged (pass `allow_nonfinite` to convert it anyway)."
            )
        note(f"warning: {what} has NaN or infinite weights in {names}; its samples will be garbage")
    if huge:
        names = ", ".join(huge[:3]) + (f" (+{len(huge) - 3} more)" if len(huge) > 3 else "")
        note(
            f"warning: {what} has weights larger than {ABSURD:g} in magnitude ({names}); the checkpoint may be damaged"
        )


def choose_family(sd: StateDict, meta: Meta, family: str | None = None) -> tuple[str, str]:
    """(family name, why) from --family, else detection by weights with hints breaking ties."""
    if family:
        family = family.lower()
        if family not in FAMILIES:
            raise FlowmapError(f"unknown `family` {family!r}; known families: {', '.join(sorted(FAMILIES))}.")
        return family, "--family"
    candidates = [n for n in DETECTION_ORDER if FAMILIES[n].detect(sd)]

    def fits(name: str) -> bool:
        """Detected, or at least readable by the family (`accepts`, looser than detect) when a hint names it."""
        fam = FAMILIES[name]
        return name in candidates or fam.accepts(sd)

    alias = meta.get("family_hint")  # the alias table names the family of its files
    if alias:
        if alias not in FAMILIES:
            raise FlowmapError(
                f"{alias} checkpoints are not supported by this flowmap installation; upgrade with `pip install -U flowmap-convert`."
            )
        if fits(alias):
            return alias, "weights + source alias"
        fitting = ", ".join(candidates) or "no known family"
        raise FlowmapError(
            f"the file does not look like a {alias} checkpoint (its weights fit: {fitting}); pass `family` to force one."
        )
    if not candidates:
        sample = ", ".join(sorted(sd)[:5])
        raise FlowmapError(
            f"no known model family matches this checkpoint (keys: {sample}, ...); pass `family` if it is a supported model."
        )
    hinted = [n for n in DETECTION_ORDER if FAMILIES[n].hint(meta) and fits(n)]
    if len(hinted) == 1:
        return hinted[0], "weights + file name / training args"
    if len(candidates) == 1:
        return candidates[0], "weights"
    if FAMILIES[candidates[0]].tie_winner:
        return candidates[0], f"weights; could also be {', '.join(candidates[1:])}"
    raise FlowmapError(
        f"the weights fit the {' and '.join(candidates)} families, which read them differently; pass `family` {candidates[0]} (or another of them)."
    )


def load_source(source: str, **options):
    """Resolve, read, detect and build any supported source; returns (FlowMap in canonical convention, provenance).

    `options` are the fields of `LoadOptions` (an unknown name is a TypeError). allow_nonfinite: False refuses
    NaN/Inf weights (convert), True or None only warns. trust_pickle given (True or False) marks a command that
    has the --trust-pickle flag (its hint is printed then only).
    """
    opts = LoadOptions(**options)
    model, info = _load_source(source, opts)
    check_weights(model, str(source), opts.allow_nonfinite)
    return model, info


def _load_source(source: str, options: LoadOptions):
    family = options.family
    res = resolve(
        str(source),
        revision=options.revision,
        filename=options.filename,
        sha256=options.sha256,
        allow_http=options.allow_http,
    )
    path = res.path
    if path.is_dir():
        if is_model_dir(path):  # our own export: config.json says everything
            if family not in (None, "flowmap"):
                raise FlowmapError(
                    f"{source} is an exported flowmap directory; drop `family` {family} (or pass `family` flowmap)."
                )
            model = read_model_dir(path)
            info = dict(model.config.provenance)
            info.setdefault("source", str(source))
            digest = sha256_file(path / "model.safetensors")
            check_sha256(path / "model.safetensors", options.sha256, digest)
            info["sha256"] = digest
            if info.get("family") not in (None, "flowmap"):
                info.setdefault("source_family", info["family"])
            info["family"] = "flowmap"
            info["loaded_from"] = str(source)
            return model, info
        claims = [n for n in DETECTION_ORDER if FAMILIES[n].claims_dir(path)]
        if family and family in claims or (not family and claims):
            name = family or claims[0]
            model, used = FAMILIES[name].build_dir(path, options)
            info = {**res.info, "weights": used, "family": name}
            model.config = model.config.replace(provenance=info)
            note(f"family {name} (directory layout); weights: {used}")
            return model, info
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(WEIGHT_SUFFIXES))
        if len(files) != 1:
            raise FlowmapError(
                f"{source} is a directory with {len(files)} checkpoint files and no flowmap config.json; pass the checkpoint file itself."
            )
        path = files[0]
        res.info.update(file=path.name, sha256=check_sha256(path, options.sha256))
        res.name = path.name
    ckpt = read_checkpoint(
        path,
        weights=options.weights or "auto",
        trust_pickle=bool(options.trust_pickle),
        pickle_flag=options.trust_pickle is not None,
        mapped=options.mapped,  # `flowmap convert`: weights stay mapped until exported
    )
    check_key_indices(ckpt.state_dict, str(path))
    check_tensor_dtypes(ckpt.state_dict, str(path))
    meta: Meta = {"args": ckpt.args or {}, "name": res.name, "family_hint": res.family_hint}
    name, why = choose_family(ckpt.state_dict, meta, family)
    note(f"family {name} ({why}); weights: {ckpt.weights}{' (EMA)' if ckpt.weights == 'ema' else ''}")
    build_opts = dataclasses.replace(options, args=dict(ckpt.args or {}), what=str(path), source_info=dict(res.info))
    model = FAMILIES[name].build(ckpt.state_dict, build_opts)
    info = {**res.info, "weights": ckpt.weights, "family": name}
    if ckpt.steps is not None:
        info["train_steps"] = ckpt.steps
    model.config = model.config.replace(provenance=info)
    return model, info


# sources reads the builtin models and the registry above, and the built-in families register on import (their
# order here is not the detection order: DETECTION_ORDER is): both are imported once this module's names exist.
from . import dit, dmf, lightningdit, mcg_ddt, rae, repa, repae, sit  # noqa: E402,F401
from .sources import check_sha256, resolve  # noqa: E402
