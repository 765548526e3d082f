"""Depth search, step 1: the plan. Every user input checked before any model is loaded; the (depth, NFE, n) cells."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..config import check_depth
from ..errors import FlowmapError
from ..validate import finite_float, int_in_range

DEFAULT_NUM_SAMPLES = 500  # chosen by benchmarks/search_depth_stability.py (see benchmarks/results/search_depth-cpu.md)
DEFAULT_TEACHER_NFE = 32


@dataclass(frozen=True)
class SearchPlan:
    """What the search will evaluate and how it ranks: depths x NFEs, sample counts per round, the metric."""

    nfes: tuple[int, ...]
    num_samples: int
    metric: str = "fd"
    reference: str = "auto"
    features: str = "auto"
    teacher_nfe: int = DEFAULT_TEACHER_NFE
    bootstrap: int = 200
    ci: float = 0.9
    halving: bool = False
    min_halving_samples: int = 100
    best_for_nfe: int | None = None
    depths: tuple[int, ...] | None = None  # None until the model's block count is known

    def with_depths(self, depths: Sequence[int] | None, num_blocks: int) -> SearchPlan:
        """The plan for a model of `num_blocks` blocks (default depths when none were asked for)."""
        ds = default_depths(num_blocks) if depths is None else [int(d) for d in depths]
        if not ds:
            raise FlowmapError("no depths to search; pass e.g. `depths` 2,4,6.")
        for d in ds:
            check_depth(d, num_blocks)
        return SearchPlan(**{**self.__dict__, "depths": tuple(sorted(set(ds)))})

    @property
    def rounds(self) -> list[int]:
        """Samples per successive-halving round (one round without halving)."""
        if not self.halving:
            return [self.num_samples]
        return halving_rounds(len(self.depths), self.num_samples, self.min_halving_samples)

    @property
    def evaluations(self) -> int:
        """How many (depth, NFE) evaluations the plan makes (the progress total)."""
        return planned_evaluations(len(self.depths), len(self.nfes), self.rounds)

    @property
    def chosen_nfe(self) -> int:
        """Which NFE's best depth is 'the' best depth (--best-for-nfe, else the smallest NFE)."""
        return self.best_for_nfe if self.best_for_nfe is not None else min(self.nfes)


def make_plan(
    nfe,
    num_samples: int | None = None,
    metric: str = "fd",
    reference: str = "auto",
    features: str = "auto",
    teacher_nfe: int = DEFAULT_TEACHER_NFE,
    bootstrap: int = 200,
    ci: float = 0.9,
    halving: bool = False,
    min_halving_samples: int = 100,
    best_for_nfe: int | None = None,
) -> SearchPlan:
    """Validate the cheap inputs (one FlowmapError each) and return the plan (depths come with the model)."""
    nfes = [int(n) for n in (nfe if isinstance(nfe, (list, tuple)) else [nfe])]
    if not nfes:
        raise FlowmapError("`nfe` needs at least one value, e.g. `nfe` 1,4.")
    for n in nfes:
        if n < 1:
            raise FlowmapError(f"`nfe` values must be positive integers, got {n}; use e.g. `nfe` 1,4.")
    if len(set(nfes)) != len(nfes):
        raise FlowmapError(f"`nfe` lists a value twice ({nfes}); list each NFE once.")
    num_samples = DEFAULT_NUM_SAMPLES if num_samples is None else int(num_samples)
    if num_samples < 2:
        raise FlowmapError(
            f"a Fréchet distance needs at least 2 samples, got `num_samples` {num_samples}; use e.g. `num_samples` {DEFAULT_NUM_SAMPLES}."
        )
    if metric not in ("fd", "mse"):
        raise FlowmapError(f"unknown `metric` {metric!r}; choose fd or mse.")
    if metric == "mse" and reference not in ("teacher", "auto"):
        raise FlowmapError(
            "`metric` mse is the paired error to the teacher's samples; use it with `reference` teacher."
        )
    ci = finite_float("`ci`", ci, 0.0, 1.0, lo_open=True, hi_open=True)
    if teacher_nfe < 1:
        raise FlowmapError(f"`teacher_nfe` must be a positive integer, got {teacher_nfe}.")
    bootstrap = int_in_range("`bootstrap`", bootstrap, 0, 100_000)
    if best_for_nfe is not None and best_for_nfe not in nfes:
        raise FlowmapError(f"`best_for_nfe` {best_for_nfe} is not among the searched NFEs {nfes}; add it to `nfe`.")
    return SearchPlan(
        nfes=tuple(nfes),
        num_samples=num_samples,
        metric=metric,
        reference=reference,
        features=features,
        teacher_nfe=int(teacher_nfe),
        bootstrap=bootstrap,
        ci=ci,
        halving=bool(halving),
        min_halving_samples=int(min_halving_samples),
        best_for_nfe=best_for_nfe,
    )


def default_depths(num_blocks: int) -> list[int]:
    """Every depth for small models; for deep ones a grid over 4/7..6/7 of the blocks (16..24 step 2 for 28 blocks)."""
    if num_blocks <= 12:
        return list(range(1, num_blocks + 1))
    step = max(1, num_blocks // 14)
    lo, hi = round(4 * num_blocks / 7), round(6 * num_blocks / 7)
    return list(range(lo, hi + 1, step))


def halving_rounds(n_depths: int, num_samples: int, min_samples: int) -> list[int]:
    """Sample counts per successive-halving round: the final round uses num_samples, each earlier one half as many."""
    n_rounds = max(1, math.ceil(math.log2(max(n_depths, 1))))  # halve until one or two depths remain
    counts = [max(min(min_samples, num_samples), num_samples >> (n_rounds - 1 - r)) for r in range(n_rounds)]
    out = []
    for c in counts:  # drop rounds that would not add samples
        if not out or c > out[-1]:
            out.append(c)
    return out


def planned_evaluations(n_depths: int, n_nfe: int, rounds: list[int]) -> int:
    """How many (depth, NFE) evaluations the plan makes (for the progress bar)."""
    total, alive = 0, n_depths
    for _ in range(len(rounds)):
        total += alive * n_nfe
        alive = max(1, math.ceil(alive / 2))
    return total


def survivors(rows: list[dict], depths: list[int], nfes: Sequence[int], metric: str) -> list[int]:
    """Keep the better half of the depths by mean rank of the probe across NFEs."""
    ranks = {d: 0.0 for d in depths}
    for n_fe in nfes:
        ordered = sorted((row for row in rows if row["nfe"] == n_fe), key=lambda row: row[metric])
        for i, row in enumerate(ordered):
            ranks[row["depth"]] += i
    keep = max(1, math.ceil(len(depths) / 2))
    return sorted(sorted(depths, key=lambda d: (ranks[d], d))[:keep])
