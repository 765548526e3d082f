"""Digits FD of fine-tuned flow maps at 1 / 2 / 4 NFE and the base at 8 / 16 / 32 Euler steps (2000 samples, seed 123).

python benchmarks/digits/eval_builtin_dmf.py MODEL_DIR [MODEL_DIR ...]   # writes eval_dmf.json
"""

import json
import sys
import time

import numpy as np
import torch

import flowmap_convert as fm
from flowmap_convert.digits import evaluate_digits
from flowmap_convert.sampling import sample

torch.set_num_threads(1)


def ev(model, nfe, seed=123, n=2000):
    t0 = time.time()
    im = sample(model, nfe=nfe, classes=list(range(10)), num_samples=n, seed=seed, batch_size=500)
    return {**evaluate_digits(im, np.arange(n) % 10), "sec": round(time.time() - t0, 1)}


out = {}
for path in sys.argv[1:]:
    m = fm.load(path)
    out[path] = {nfe: ev(m, nfe) for nfe in (1, 2, 4)}
    print(path, json.dumps(out[path]), flush=True)
base = fm.load("builtin:digits-sit")
out["base"] = {nfe: ev(base, nfe) for nfe in (8, 16, 32)}
print("base", json.dumps(out["base"]), flush=True)
json.dump(out, open("eval_dmf.json", "w"), indent=1)
