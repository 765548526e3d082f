"""Re-evaluate rows of a committed results.json with the current code and compare the digits FD exactly.

After a refactor that must not change behaviour (issue 21's moves), the evaluations of models that need no training
(the base and the shipped builtin:digits-dmf) reproduce to the last bit or the refactor changed something.

    python benchmarks/digits/recheck.py [--rows 1,9] [--nfe 1,2]
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=HERE / "results.json")
    ap.add_argument("--rows", default="1,9", help="row groups whose untrained-model evaluations to redo")
    ap.add_argument("--nfe", default="1,2", help="which NFEs")
    a = ap.parse_args()
    rows = {int(x) for x in a.rows.split(",")}
    nfes = {int(x) for x in a.nfe.split(",")}
    plan = bench.build_plan(bench.PROFILES["full"])
    old = json.loads(a.results.read_text())
    same = True
    for r in old["rows"]:
        row = next(
            (p for p in plan.rows if p.label == r["setting"] and p.nfe == r["nfe"] and p.group == r["row"]), None
        )
        if row is None or r["row"] not in rows or r["nfe"] not in nfes or r["fd"] is None or "job" in row.model:
            continue
        spec = plan.jobs[row.eval_key].spec
        t0 = time.perf_counter()
        got = bench.run_job(spec, str(HERE / ".recheck"))["fd"]
        ok = got == r["fd"]
        same &= ok
        print(
            f"row {r['row']} {r['setting']} NFE {r['nfe']}: committed {r['fd']!r}, now {got!r} "
            f"({'identical' if ok else 'DIFFERENT'}, {time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
