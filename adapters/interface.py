"""What a source family is: the adapter interface (`FamilyAdapter`), its defaults (`Family`) and the load options.

A family module defines one class deriving from `Family`, decorated `@register("<name>")` (adapters/__init__.py),
and adds its name to `DETECTION_ORDER` there (docs/architecture.md, "Where new code goes").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, runtime_checkable

if TYPE_CHECKING:  # annotations only: the model layer imports nothing from adapters
    import torch

    from ..model import FlowMap

StateDict = dict[str, "torch.Tensor"]


class Meta(TypedDict, total=False):
    """Evidence beside the weights that a family's `hint` may weigh."""

    args: dict[str, Any]  # training args stored in the checkpoint ({} when none)
    name: str  # the file name the weights came from
    family_hint: str | None  # the family the alias table names for the source


@dataclass(frozen=True)
class LoadOptions:
    """Everything a caller may say about a source beside its name (the keywords of `flowmap_convert.load`).

    `args` and `what` are filled in by `load_source` for the family's `build`: the checkpoint's training args and
    the name used in messages.
    """

    family: str | None = None  # a family name that overrides detection
    revision: str | None = None  # Hub branch, tag or commit
    filename: str | None = None  # the file inside a Hub repo
    sha256: str | None = None  # expected digest of the weights file
    weights: str | None = None  # auto | ema | model (None: auto)
    allow_http: bool | None = None  # plain-http downloads from localhost (None: the environment decides)
    trust_pickle: bool | None = None  # None: the caller offers no way to trust pickles (no hint about one)
    mapped: bool = False  # weights stay memory-mapped (a caller that exports and exits)
    allow_nonfinite: bool | None = None  # False refuses NaN / Inf weights, True or None only warns
    num_heads: int | None = None  # attention heads (not stored in DiT-style weights)
    depth: int | None = None  # encoder / decoder split of a decoupled model
    encoder_depth: int | None = None  # REPA legacy `decoder_blocks.*` files: blocks before them
    vae_source: str | None = None  # diffusers pipelines: where the vae/ folder is fetched from
    decoder_blocks: int | None = None  # RAE DiT^DH: blocks of the wide head (default 2)
    input_size: int | None = None  # RAE DiT^DH / DDT without pos_embed: the latent side
    in_channels: int | None = None  # DDT: latent channels (the patch embedder's width mixes them with the patch)
    decoder_repo: str | None = None  # RAE: the Hub repo of the pixel decoder
    decoder_file: str | None = None  # RAE: the decoder file in it
    stats_file: str | None = None  # RAE: the latent statistics file in it
    args: dict[str, Any] = field(default_factory=dict)
    what: str | None = None
    source_info: dict[str, Any] = field(default_factory=dict)  # the resolved source (repo, file) for release names


@runtime_checkable
class FamilyAdapter(Protocol):
    """A source family: recognises its weights and builds a canonical FlowMap from them."""

    name: str
    tie_winner: bool  # when several families fit and no hint decides, the first fitting one wins only if it says so

    def detect(self, sd: StateDict) -> bool:
        """True when the weights are this family's, from keys and shapes alone."""
        ...

    def build(self, sd: StateDict, options: LoadOptions) -> FlowMap:
        """A FlowMap whose ModelConfig names the family's conventions, weights loaded strictly."""
        ...

    def hint(self, meta: Meta) -> bool:
        """Evidence beside the weights (training args, file name) that breaks detection ties."""
        ...

    def accepts(self, sd: StateDict) -> bool:
        """Weights the family can read although `detect` does not claim them (used when a hint names it)."""
        ...

    def claims_dir(self, path: Path) -> bool:
        """A local directory layout this family reads itself (e.g. a diffusers pipeline)."""
        ...

    def build_dir(self, path: Path, options: LoadOptions) -> tuple[FlowMap, str]:
        """(FlowMap, weights file used) from a directory that `claims_dir` accepted."""
        ...

    def claims_layout(self, files: list[str]) -> list[str] | None:
        """Hub download patterns for a directory-shaped repo with these files, or None."""
        ...


class Family:
    """Defaults for the optional members of `FamilyAdapter`; a family adds `detect` and `build` and overrides the
    rest where it has something to say (without `detect` / `build` it does not satisfy the Protocol)."""

    name = ""  # set by @register
    tie_winner = False

    def hint(self, meta: Meta) -> bool:
        return False

    def accepts(self, sd: StateDict) -> bool:
        return False

    def claims_dir(self, path: Path) -> bool:
        return False

    def build_dir(self, path: Path, options: LoadOptions) -> tuple[FlowMap, str]:
        raise NotImplementedError(f"{type(self).__name__} claims no directory layout")

    def claims_layout(self, files: list[str]) -> list[str] | None:
        return None


NO_OPTIONS = LoadOptions()  # the defaults: what a build called without options sees
