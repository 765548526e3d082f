"""The shared vocabulary of the command line: one spelling, one default and one help text per shared concept.

Every command that takes one of these concepts declares it from this table (the CLI modules and the generated
options of `finetune` / `sample` alike), so `--device` means the same thing, with the same words, everywhere.

Library code never names a flag. A user-facing error from the library names the *parameter* in backticks
(`` `lr` must be > 0, got nan``, `` pass `family` sit``); the CLI turns each backticked parameter it knows into
its flag with `for_cli`, from one table (`PARAM_FLAGS`): the shared concepts below, the parameters whose options
a CLI module declares itself (`CLI_PARAMS`), plus whatever the option declarations register.
`devtools/house_counts.py` counts the library errors that still name a flag (none).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Concept:
    """One shared command-line concept: its flag (and short alias), help text and metavar."""

    flag: str
    help: str
    short: str | None = None
    metavar: str | None = None


# The default output directory of every command is `flowmap-<command>` (flowmap-convert, flowmap-finetune, ...).
def default_out(command: str) -> str:
    """The one default-output naming rule: `flowmap-<command>` in the working directory."""
    return f"flowmap-{command}"


SHARED: dict[str, Concept] = {
    "model": Concept(
        "MODEL",
        "Exported flowmap directory, Hub id (owner/name), https:// URL, local checkpoint or builtin:NAME.",
    ),
    "out": Concept("--out", "Output directory (default: flowmap-<command>).", short="-o"),
    "device": Concept("--device", "cpu, cuda or cuda:N (default: CUDA when present, else the CPU)."),
    "threads": Concept(
        "--threads",
        "CPU threads (default: OMP_NUM_THREADS, else 1 on up to 4 cores, else half the cores, at most 8).",
    ),
    "seed": Concept("--seed", "Random seed; sample i's noise depends only on (seed, i)."),
    "nfe": Concept("--nfe", "Network evaluations per sample."),
    "guidance_interval": Concept(
        "--guidance-interval", "LO,HI: guide only where LO <= t <= HI (t = 1 is noise).", metavar="LO,HI"
    ),
    "cfg_scale": Concept("--cfg-scale", "Classifier-free guidance scale (1 = off; default: the model's)."),
    "shift": Concept("--shift", "Time-grid shift t' = s t / (1 + (s - 1) t) (default: the model's)."),
    "sampler": Concept("--sampler", "euler (flow-map jumps, or plain Euler for base models), heun, restart or ctm."),
    "batch_size": Concept("--batch-size", "Samples per forward pass."),
    "num_samples": Concept("--num-samples", "How many samples.", short="-n"),
    "classes": Concept("--classes", "Comma-separated class labels, cycled over the samples (default: all classes)."),
    "revision": Concept("--revision", "Hub branch, tag or commit."),
    "family": Concept("--family", "Override family detection (see docs/checkpoints.md for the families)."),
}

# parameter name -> flag, for errors raised by library code (see for_cli); option declarations add to it.
PARAM_FLAGS: dict[str, str] = {name: c.flag for name, c in SHARED.items() if c.flag.startswith("--")}

# Parameters of the library's functions whose options the CLI modules declare by hand (not a shared concept above,
# not a field of an options dataclass): load/convert's keywords, search_depth's, evaluate's, push's, the output rules'.
CLI_PARAMS: dict[str, str] = {
    "allow_nonfinite": "--allow-nonfinite",
    "best_for_nfe": "--best-for-nfe",
    "bootstrap": "--bootstrap",
    "ci": "--ci",
    "commit_message": "--commit-message",
    "depths": "--depths",
    "encoder_depth": "--encoder-depth",
    "features": "--features",
    "filename": "--filename",
    "force": "--force",
    "include": "--include",
    "metric": "--metric",
    "metrics": "--metrics",
    "num_heads": "--num-heads",
    "reference": "--reference",
    "sha256": "--sha256",
    "teacher_nfe": "--teacher-nfe",
    "trust_pickle": "--trust-pickle",
    "weights": "--weights",
    "write_best": "--write-best",
}
PARAM_FLAGS.update(CLI_PARAMS)

_BACKTICKED = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")


def register_flags(mapping: dict[str, str]) -> None:
    """Add parameter -> flag pairs (a declaration module calls this once at import)."""
    PARAM_FLAGS.update(mapping)


def for_cli(message: str) -> str:
    """A library message as the CLI shows it: each backticked known parameter becomes its flag (`lr` -> --lr)."""
    return _BACKTICKED.sub(lambda m: PARAM_FLAGS.get(m.group(1), m.group(0)), message)
