"""Digits FD of fine-tuned flow maps at 1 / 2 / 4 NFE and the base at 8 / 16 / 32 Euler steps (2000 samples, seed 123).

python benchmarks/digits/eval_builtin_dmf.py MODEL_DIR [MODEL_DIR ...]   # writes eval_dmf.json

The JSON goes to eval_dmf.json in the current directory (EVAL_DMF_OUT to choose another file); an existing file is
replaced only when this script wrote it.
"""

import json
import os
import sys
import time

import numpy as np
import torch

import flowmap_convert as fm
from flowmap_convert.digits import evaluate_digits
from flowmap_convert.outputs import write_text_atomic
from flowmap_convert.sampling import sample

torch.set_num_threads(1)
WRITER = "benchmarks/digits/eval_builtin_dmf.py"
OUT = os.environ.get("EVAL_DMF_OUT", "eval_dmf.json")


def ours(path: str) -> bool:
    """True when `path` does not exist or holds a JSON this script wrote."""
    try:
        with open(path) as f:
            return json.load(f).get("written_by") == WRITER
    except FileNotFoundError:
        return True
    except (OSError, ValueError, AttributeError):
        return False


def ev(model, nfe, seed=123, n=2000):
    t0 = time.time()
    im = sample(model, nfe=nfe, classes=list(range(10)), num_samples=n, seed=seed, batch_size=500)
    return {**evaluate_digits(im, np.arange(n) % 10), "sec": round(time.time() - t0, 1)}


if not ours(OUT):  # before any sampling: never replace a file someone else wrote
    print(f"error: {OUT} exists and was not written by {WRITER}; set EVAL_DMF_OUT to another file.", file=sys.stderr)
    sys.exit(2)
out = {"written_by": WRITER}
for path in sys.argv[1:]:
    m = fm.load(path)
    out[path] = {nfe: ev(m, nfe) for nfe in (1, 2, 4)}
    print(path, json.dumps(out[path]), flush=True)
base = fm.load("builtin:digits-sit")
out["base"] = {nfe: ev(base, nfe) for nfe in (8, 16, 32)}
print("base", json.dumps(out["base"]), flush=True)
write_text_atomic(OUT, json.dumps(out, indent=1) + "\n")
