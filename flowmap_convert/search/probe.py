"""Depth search, step 2: the probes. Sample each (depth, NFE) cell with common random numbers and measure it.

For every cell the probe is the Fréchet distance of the flow map's samples to a reference (dataset statistics, a
stats .npz, or the source model's own many-step Euler samples from the same noise and labels, the "teacher"), with
a bootstrap CI; against the teacher it also reports the paired per-sample mean squared error. Results are cached per
(depth, NFE, settings) in `<out>/cache/`, so an interrupted search resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import FlowmapError
from ..metrics import bootstrap_fd, bootstrap_mean, paired_mse
from ..outputs import atomic_file
from ..progress import Progress
from ..sampling import Sampler, SampleSettings
from .plan import SearchPlan, survivors


class FlowmapWarning(UserWarning):
    """A result that is computed but may mislead (e.g. fewer samples than feature dimensions)."""


@dataclass(frozen=True)
class ProbeSettings:
    """Everything a cached (depth, NFE) result depends on besides depth and NFE; hashed into the cache file name."""

    source_id: str
    num_samples: int
    seed: int
    sampler: str
    features: str
    reference: str  # 'teacher:<nfe>' or the reference statistics' digest
    metric: str
    bootstrap: int
    ci: float
    classes: tuple[int, ...] | None
    shift: float | None
    cfg_scale: float | None

    def key(self) -> str:
        """Short stable hash of the settings."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def velocity_model(model):
    """The source as a plain velocity model u(x, t, t) sharing weights (the teacher for the reference samples)."""
    if model.config.conditioning == "velocity":
        return model
    return model.view(model.config.replace(conditioning="velocity", depth=None))


def source_id(model, source) -> str:
    """Identity of the weights for cache keys: the provenance sha256, else a hash of the parameters."""
    prov = model.config.provenance or {}
    if prov.get("sha256"):
        return f"{prov.get('source', source)}@{prov['sha256']}"
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def warn(message: str) -> None:
    """Emit a FlowmapWarning (the CLI prints it as one `warning:` line on stderr)."""
    warnings.warn(message, FlowmapWarning, stacklevel=3)


def write_json(path: Path, data) -> None:
    """Atomic JSON write (temp name + os.replace)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2))


class Draw:
    """Samples 0..n-1 of a model at some NFE with the search's one SampleSettings (common random numbers)."""

    def __init__(self, settings: SampleSettings, decoder):
        self.settings = settings
        self.decoder = decoder

    def __call__(self, model, nfe: int, n: int, sampler: str | None = None):
        """uint8 NHWC images and float latents."""
        s = replace(self.settings, nfe=nfe, sampler=sampler or self.settings.sampler)
        run = Sampler(model, s, self.decoder)
        images, latents = run.draw(range(n), run.labels(n), return_latents=True)
        return images, latents.numpy()


@dataclass
class Probe:
    """Everything a probe needs: the model, its sampler, the extractor, the reference, the cache."""

    model: object
    plan: SearchPlan
    draw: Draw
    extractor: object
    ref_stats: object  # ReferenceStats or None (teacher)
    settings: ProbeSettings
    cache: Path | None
    teacher: dict | None = None

    def load_teacher(self, n: int) -> None:
        """The teacher's latents and features for samples 0..n-1 (cached as .npz in the out dir)."""
        st = self.settings
        key = hashlib.sha256(
            json.dumps(
                [st.source_id, st.seed, st.features, self.plan.teacher_nfe, n, st.classes, st.shift, st.cfg_scale]
            ).encode()
        ).hexdigest()[:12]
        path = self.cache / f"teacher-nfe{self.plan.teacher_nfe}-{key}.npz" if self.cache is not None else None
        if path is not None and path.is_file():
            try:
                data = np.load(path)
                self.teacher = {"latents": data["latents"], "features": data["features"]}
                return
            except (OSError, ValueError, KeyError):
                pass
        images, latents = self.draw(velocity_model(self.model), self.plan.teacher_nfe, n, sampler="euler")
        feats = self.extractor.features(images)
        if path is not None:
            with atomic_file(path, suffix=".npz") as tmp:
                np.savez(tmp, latents=latents, features=feats)
        self.teacher = {"latents": latents, "features": feats}

    def cell(self, depth: int, n_fe: int, n: int) -> dict:
        """One (depth, NFE, n) result, from the cache when an identical one was computed before."""
        key = ProbeSettings(**{**asdict(self.settings), "num_samples": n}).key()
        path = self.cache / f"depth{depth}-nfe{n_fe}-{key}.json" if self.cache is not None else None
        if path is not None and path.is_file():
            try:
                row = json.loads(path.read_text())
                row["cached"] = True
                return row
            except (OSError, ValueError):
                pass  # a damaged cache entry is recomputed
        row = self.measure(depth, n_fe, n)
        if path is not None:
            write_json(path, row)
        row["cached"] = False
        return row

    def measure(self, depth: int, n_fe: int, n: int) -> dict:
        """Sample the flow map split at `depth` with `n_fe` evaluations and measure it against the reference."""
        st = self.settings
        t0 = time.perf_counter()
        images, latents = self.draw(self.model.with_depth(depth), n_fe, n)
        feats = self.extractor.features(images)
        seed = st.seed * 7919 + depth * 131 + n_fe  # bootstrap draws are reproducible per cell
        row = {"depth": depth, "nfe": n_fe, "num_samples": n}
        if self.teacher is not None:
            row["fd"], row["fd_ci"] = bootstrap_fd(
                feats, ref_features=self.teacher["features"][:n], draws=st.bootstrap, ci=st.ci, seed=seed
            )
            row["mse"], row["mse_ci"] = bootstrap_mean(
                paired_mse(latents, self.teacher["latents"][:n]), draws=st.bootstrap, ci=st.ci, seed=seed
            )
        else:
            row["fd"], row["fd_ci"] = bootstrap_fd(
                feats, self.ref_stats.mu, self.ref_stats.sigma, draws=st.bootstrap, ci=st.ci, seed=seed
            )
        row["seconds"] = round(time.perf_counter() - t0, 3)
        return row


def run_probes(probe: Probe, progress: bool = False) -> tuple[list[dict], list[dict]]:
    """Every planned cell (with successive halving when planned): (all result rows, halving log)."""
    plan = probe.plan
    rounds = plan.rounds
    total = plan.evaluations + (1 if probe.ref_stats is None else 0)
    results: list[dict] = []
    halving_log: list[dict] = []
    with Progress(total, "search-depth", "probes", mode="auto" if progress else "off", every=5.0) as bar:
        if probe.ref_stats is None:
            bar.postfix = {"now": f"teacher {plan.teacher_nfe}-step Euler"}
            probe.load_teacher(plan.num_samples)
            bar.advance()
        cells = [(d, n_fe) for d in plan.depths for n_fe in plan.nfes]
        for r, n in enumerate(rounds):
            round_rows = []
            for d, n_fe in cells:
                bar.postfix = {"now": f"depth {d} NFE {n_fe} n {n}"}
                round_rows.append(probe.cell(d, n_fe, n))
                bar.advance(1, **{plan.metric: round_rows[-1][plan.metric]})
            results.extend(round_rows)
            alive = sorted({row["depth"] for row in round_rows})
            if r + 1 < len(rounds):
                keep = survivors(round_rows, alive, plan.nfes, plan.metric)
                halving_log.append({"round": r, "num_samples": n, "depths": alive, "kept": keep})
                cells = [(d, n_fe) for d in keep for n_fe in plan.nfes]
            elif plan.halving:
                halving_log.append({"round": r, "num_samples": n, "depths": alive, "kept": alive})
    return results, halving_log


def check_reference_dim(ref_stats, extractor, dim) -> None:
    """Reference statistics must have the extractor's feature dimension."""
    if ref_stats is not None and dim is not None and ref_stats.dim != dim:
        raise FlowmapError(
            f"reference statistics {ref_stats.source} have dimension {ref_stats.dim} but {extractor.name} features have {dim}; recompute the reference with `features` {extractor.name}."
        )
