"""Depth search, step 3: the report. Final rows, the best depth per NFE, search.json / search.png, --write-best."""

from __future__ import annotations

from pathlib import Path

from ..io import export
from .plan import SearchPlan


def final_rows(results: list[dict]) -> list[dict]:
    """For each (depth, NFE), the result with the most samples (the last round it took part in)."""
    best: dict[tuple[int, int], dict] = {}
    for row in results:
        k = (row["depth"], row["nfe"])
        if k not in best or row["num_samples"] > best[k]["num_samples"]:
            best[k] = row
    return [best[k] for k in sorted(best)]


def build_report(plan: SearchPlan, probe, results, halving_log, source_name: str, ref_kind: str, timing) -> dict:
    """The search.json content."""
    final = final_rows(results)
    best = {}
    for n_fe in plan.nfes:
        rows = [row for row in final if row["nfe"] == n_fe]
        best[str(n_fe)] = min(rows, key=lambda row: (row[plan.metric], row["depth"]))["depth"]
    s = probe.draw.settings
    return {
        "source": source_name,
        # the weights' identity (provenance sha256, else a hash of the parameters): result lines name it
        "source_sha256": str(probe.settings.source_id).rsplit("@", 1)[-1],
        "num_blocks": probe.model.config.num_blocks,
        "depths": list(plan.depths),
        "nfe": list(plan.nfes),
        "num_samples": plan.num_samples,
        "seed": s.seed,
        "sampler": s.sampler,
        "sampling": s.to_dict(),
        "features": probe.extractor.name,
        "reference": {
            "kind": ref_kind,
            "teacher_nfe": plan.teacher_nfe if ref_kind == "teacher" else None,
            "source": probe.ref_stats.source
            if probe.ref_stats is not None
            else f"teacher: {plan.teacher_nfe}-step Euler samples of the source velocity model",
        },
        "metric": plan.metric,
        "bootstrap": {"draws": plan.bootstrap, "ci": plan.ci},
        "halving": halving_log or None,
        "results": final,
        "all_results": results if plan.halving else None,
        "best": best,
        "best_depth": best[str(plan.chosen_nfe)],
        "best_for_nfe": plan.chosen_nfe,
        "settings_key": probe.settings.key(),
        "wall_seconds": round(timing[0], 2),
        "cpu_seconds": round(timing[1], 2),
        "written": {},
    }


def search_provenance(report: dict) -> dict:
    """What --write-best records in the exported config: provenance["search"] (config.default_depth reads
    exactly its "best_depth")."""
    return {
        "best_depth": int(report["best_depth"]),
        "nfe": list(report["nfe"]),
        "best_for_nfe": report["best_for_nfe"],
        "best": dict(report["best"]),
        "metric": report["metric"],
        "features": report["features"],
        "reference": report["reference"]["kind"],
        "num_samples": report["num_samples"],
        "depths": list(report["depths"]),
    }


def write_best(model, report: dict, out) -> Path:
    """Export the model converted at the best depth, with the search recorded in its provenance."""
    best_model = model.with_depth(report["best_depth"])
    prov = dict(model.config.provenance)
    prov["search"] = search_provenance(report)
    best_model.config = best_model.config.replace(provenance=prov)
    return export(best_model, out)
