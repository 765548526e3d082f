"""Seconds per step of each fine-tuning objective on builtin:digits-sit at one thread, side by side, for the
equal-wall step counts of bench.py's row 6 (Profile.mfrae_chains).

Each objective runs 10 and 40 steps with the bench's settings (bench.mfrae_stage for CMT / MFD / MFT; DMF with
JVP at batch 32); the difference over 30 steps removes the start-up and export. Prints a JSON line.

    python benchmarks/digits/step_costs.py
"""

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))

import bench  # noqa: E402
import torch  # noqa: E402

import flowmap_convert as fm  # noqa: E402


def main() -> dict:
    torch.set_num_threads(1)
    p = bench.PROFILES["full"]
    runs = {"dmf": ("dmf", None, "jvp", {})}
    for objective in ("cmt", "mfd", "mft"):
        runs[objective] = (objective, *bench.mfrae_stage(objective, p))
    per_step = {}
    work = Path(tempfile.mkdtemp(prefix="step-costs-"))
    try:
        for name, (objective, loss, derivative, extra) in runs.items():
            extra = dict(extra)
            batch = extra.pop("batch_size", p.batch)
            walls = []
            for steps in (10, 40):
                t0 = time.perf_counter()
                fm.finetune(
                    bench.BASE,
                    data="builtin:digits",
                    objective=objective,
                    steps=steps,
                    batch_size=batch,
                    lr=p.lr,
                    out=str(work / f"{name}-{steps}"),
                    derivative=derivative,
                    seed=p.ft_seed,
                    depth=p.best_depth,
                    device="cpu",
                    progress=False,
                    grid=False,
                    **({"loss": loss} if loss else {}),
                    **extra,
                )
                walls.append(time.perf_counter() - t0)
            per_step[name] = round((walls[1] - walls[0]) / 30, 4)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {"s_per_step": per_step, "relative_to_dmf": {k: round(v / per_step["dmf"], 2) for k, v in per_step.items()}}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
