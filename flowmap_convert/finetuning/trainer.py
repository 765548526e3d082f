"""The fine-tuning loop (Accelerate): decoder-only or full training, EMA, checkpoints with exact resume, export.

Design notes
- The model is NOT wrapped in DDP: every JVP / finite difference runs on the plain module (torch.func must not see
  wrappers), and gradients are averaged across processes with one flat all-reduce before clipping. Replicas start
  from rank 0's weights and stay bit-identical because every rank applies the same averaged gradient.
- Every micro-step (skipped ones included) draws its noise, times and label dropout from a generator seeded by (seed, rank, micro-step,
  rollbacks), and the data position is a pure function of the micro-step, so resuming from a checkpoint replays
  exactly the numbers an uninterrupted run would have drawn.
- Checkpoints are written by rank 0 only, to a temporary file then os.replace'd (atomic).
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import default_depth
from ..errors import FlowmapError
from .common import Calls, Context
from .data import EpochSampler, check_dataset, load_dataset
from .objectives import NEEDS_TEACHER, OBJECTIVE_FNS
from .recipe import Recipe

CKPT_FORMAT = "flowmap-finetune/1"
MAX_ROLLBACKS = 3


# ---------------------------------------------------------------------------------------------------- model set-up
def prepare_model(model_or_source, recipe: Recipe):
    """A decoupled FlowMap ready to train: converted from a source if needed, with a log-variance head for the adaptive loss."""
    from ..model import FlowMap

    if isinstance(model_or_source, FlowMap):
        model = model_or_source
    else:
        from ..api import convert

        model = convert(str(model_or_source), depth=recipe.depth)
    if model.config.conditioning == "velocity":
        model = model.with_depth(recipe.depth or default_depth(model.config))
    elif recipe.depth is not None and model.config.conditioning == "decoupled" and recipe.depth != model.config.depth:
        model = model.with_depth(recipe.depth)
    if recipe.loss == "adaptive":
        model.add_logvar_head()  # DMF's log-variance head, zero-init: lv = 0 at the start
    needs_null = recipe.label_dropout > 0 or recipe.mg_scale > 0
    if needs_null and model.config.class_embed_rows <= model.config.num_classes:
        raise FlowmapError(
            "this model has no null-class embedding, which label dropout and model guidance need; pass --label-dropout 0 --mg-scale 0."
        )
    return model.float()


def set_trainable(model, part: str) -> list[nn.Parameter]:
    """Freeze what --train excludes; decoder: the embedders and blocks[:depth] stay fixed (DMF §3.1 decoder fine-tuning)."""
    for p in model.parameters():
        p.requires_grad_(True)
    net = model.net
    if hasattr(net, "pos_embed"):
        net.pos_embed.requires_grad_(False)  # fixed sin-cos table
    if part == "decoder":
        if not Calls.can_split(model):
            raise FlowmapError("--train decoder needs a decoupled DiT-style flow map; use --train all for this model.")
        for mod in (net.x_embedder, net.t_embedder, net.y_embedder, *net.blocks[: model.depth]):
            mod.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def set_attention_backend(backend: str) -> None:
    """Pass --attention to flowmap_convert.kernels when it offers a default-backend switch."""
    from .. import kernels

    setter = getattr(kernels, "set_default_backend", None)
    if setter is not None:
        setter(backend)
    elif backend not in ("auto",):
        raise FlowmapError(
            f"--attention {backend} needs flowmap_convert.kernels.set_default_backend, which this build lacks; use --attention auto."
        )


TRACKER_MODULES = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
    "comet_ml": ("comet_ml",),
    "aim": ("aim",),
    "clearml": ("clearml",),
    "dvclive": ("dvclive",),
    "trackio": ("trackio",),
    "swanlab": ("swanlab",),
}


def check_trackers(log_with) -> None:
    """Refuse --log-with names whose package is missing (Accelerate would only warn and log nothing)."""
    import importlib.util

    names = [log_with] if isinstance(log_with, str) else list(log_with or [])
    for name in (n.strip() for item in names for n in str(item).split(",")):
        if not name or name == "all":
            continue
        mods = TRACKER_MODULES.get(name)
        if mods is None:
            raise FlowmapError(f"unknown tracker {name!r} for --log-with; choose from {', '.join(TRACKER_MODULES)}.")
        if not any(importlib.util.find_spec(m) for m in mods):
            raise FlowmapError(
                f"--log-with {name} needs the `{mods[0]}` package; install it with `pip install {mods[0]}` or drop --log-with."
            )


def count_params(model) -> dict:
    """Total / trainable / frozen parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": train, "frozen": total - train}


# ---------------------------------------------------------------------------------------------------- EMA
class EMA:
    """Exponential moving average of the trainable weights, with warm-up decay_n = min(decay, (1 + n) / (10 + n))."""

    def __init__(self, model, decay: float, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.is_floating_point()}
        self.updates = 0

    @torch.no_grad()
    def update(self, model) -> None:
        """One EMA step on the parameters that train."""
        d = min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay
        for name, p in model.named_parameters():
            if p.requires_grad:
                self.shadow[name].lerp_(p.detach().float(), 1.0 - d)  # ema = d ema + (1 - d) p
        self.updates += 1

    def state_dict(self) -> dict:
        """Shadow weights and update count, for checkpoints."""
        return {"shadow": self.shadow, "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, sd: dict) -> None:
        """Inverse of state_dict."""
        self.shadow = {k: v.clone() for k, v in sd["shadow"].items()}
        self.updates = int(sd["updates"])

    def copy_to(self, model) -> None:
        """Load the EMA weights into a model with the same keys."""
        sd = model.state_dict()
        model.load_state_dict({k: self.shadow.get(k, v).to(v.dtype) for k, v in sd.items()})


# ---------------------------------------------------------------------------------------------------- helpers
def step_generator(seed: int, rank: int, micro: int, rollbacks: int) -> torch.Generator:
    """The generator of one micro-step: a pure function of its coordinates (exact resume, distinct per rank)."""
    key = (seed * 1_000_003 + rank * 7_919 + micro * 104_729 + rollbacks * 15_485_863) % (2**63 - 1)
    return torch.Generator().manual_seed(key)


def rng_state() -> dict:
    """Global RNG states (torch, numpy, python) in a weights_only-loadable form."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(s: dict) -> None:
    """Inverse of rng_state."""
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    p = s["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save to a temporary sibling, fsync, then os.replace (never a half-written checkpoint)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated CUDA memory, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource  # POSIX only

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------------------------- trainer
class Trainer:
    """One fine-tuning run: build, train (with checkpoints / resume / rollback), export."""

    def __init__(
        self,
        model_or_source,
        data,
        recipe: Recipe,
        out,
        log_with=None,
        device=None,
        progress=None,
        console=None,
        grid=True,
    ):
        from accelerate import Accelerator

        check_trackers(log_with)
        if isinstance(log_with, str):
            log_with = [n.strip() for n in log_with.split(",") if n.strip()]
        self.recipe = recipe
        self.out = Path(out)
        cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
        self.acc = Accelerator(cpu=cpu, log_with=log_with, project_dir=str(self.out), gradient_accumulation_steps=1)
        self.device = self.acc.device
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.main = self.acc.is_main_process
        self.log_with = log_with
        self.console = console
        self.grid = grid  # sample grids in the exported directories (off in quick tests)
        self.progress = progress if progress is not None else sys.stderr.isatty()
        set_attention_backend(recipe.attention)
        self.bf16 = recipe.precision == "bf16" or (recipe.precision == "auto" and self.device.type == "cuda")

        self.model = prepare_model(model_or_source, recipe).to(self.device)
        self.trainable = set_trainable(self.model, recipe.train)
        self.teacher = None
        if recipe.objective in NEEDS_TEACHER:  # frozen copy of the source before any update (MF-RAE teacher)
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False).velocity
        self.data = load_dataset(data, self.model.config.latent, self.device)
        check_dataset(self.data, self.model.config)
        self.sampler = EpochSampler(len(self.data), recipe.batch_size, self.world, self.rank, recipe.seed)
        self.calls = Calls(self.model, decoder_only=recipe.train == "decoder")
        self.ctx = Context(self.calls, recipe, self.model.config.num_classes, self.teacher)
        self.objective = OBJECTIVE_FNS[recipe.objective]
        self.opt = torch.optim.AdamW(
            self.trainable, lr=recipe.lr, betas=tuple(recipe.betas), weight_decay=recipe.weight_decay, eps=1e-8
        )
        warm = max(0, recipe.warmup)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        self.ema = EMA(self.model, recipe.ema_decay(), recipe.ema_warmup)
        self.step = 0
        self.micro = (
            0  # micro-batches drawn so far, skipped ones included: data position and noise move past bad batches
        )
        self.skipped = 0
        self.rollbacks = 0
        self.bad_run = 0
        self._broadcast_params()

    # -------------------------------------------------------------- distributed helpers
    def _broadcast_params(self) -> None:
        """Start every replica from rank 0's weights."""
        if self.world > 1:
            import torch.distributed as dist

            with torch.no_grad():
                for t in self.model.state_dict().values():
                    dist.broadcast(t, src=0)

    def _allreduce_grads(self) -> None:
        """Average the trainable gradients over processes (one flat buffer)."""
        for p in self.trainable:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.world == 1:
            return
        import torch.distributed as dist

        flat = torch.cat([p.grad.reshape(-1) for p in self.trainable])
        dist.all_reduce(flat)
        flat /= self.world
        i = 0
        for p in self.trainable:
            n = p.numel()
            p.grad.copy_(flat[i : i + n].view_as(p))
            i += n

    def weights_digest(self) -> str:
        """sha256 of every weight of this replica (bit-exact comparison across processes)."""
        import hashlib

        h = hashlib.sha256()
        for k, v in sorted(self.model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def check_replicas(self) -> None:
        """All processes must hold bit-identical weights; a FlowmapError otherwise."""
        if self.world == 1:
            return
        import torch.distributed as dist

        digests = [None] * self.world
        dist.all_gather_object(digests, self.weights_digest())
        if len(set(digests)) != 1:
            raise FlowmapError(
                f"the {self.world} replicas hold different weights after step {self.step}; this is a bug, please report it."
            )
        self.say(f"replicas identical across {self.world} processes (sha256 {digests[0][:12]})")

    def _mean_over_ranks(self, values: list[float]) -> list[float]:
        """Mean of a few scalars over processes (NaN anywhere stays NaN)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
            t /= self.world
        return t.tolist()

    # -------------------------------------------------------------- one optimizer step
    def train_step(self) -> dict:
        """Accumulate grad_accum micro-batches, sync, clip, and step unless something is non-finite."""
        rec = self.recipe
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        self.model.train()
        totals: dict[str, float] = {}
        loss_sum = 0.0
        for _ in range(rec.grad_accum):
            micro = self.micro
            self.micro += 1
            gen = step_generator(rec.seed, self.rank, micro, self.rollbacks)
            x0, y = self.data.get(self.sampler.indices(micro), gen)
            x0, y = x0.to(self.device), y.to(self.device)
            with autocast:
                loss, metrics = self.objective(self.ctx, x0, y, gen)
            (loss.float() / rec.grad_accum).backward()
            loss_sum += loss.item() / rec.grad_accum
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v / rec.grad_accum
        self._allreduce_grads()
        clip = rec.grad_clip if rec.grad_clip > 0 else float("inf")
        gnorm = float(torch.nn.utils.clip_grad_norm_(self.trainable, clip))
        keys = sorted(totals)
        reduced = self._mean_over_ranks([loss_sum, gnorm] + [totals[k] for k in keys])
        loss_mean, gnorm = reduced[0], reduced[1]
        out = {"step": self.step + 1, "loss": loss_mean, "grad_norm": gnorm, "lr": self.opt.param_groups[0]["lr"]}
        out.update({k: v for k, v in zip(keys, reduced[2:])})
        if not (math.isfinite(loss_mean) and math.isfinite(gnorm)):
            self.opt.zero_grad(set_to_none=True)
            self.skipped += 1
            self.bad_run += 1
            out["skipped"] = True
            return out
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update(self.model)
        self.bad_run = 0
        self.step += 1
        return out

    # -------------------------------------------------------------- checkpoints
    @property
    def ckpt_path(self) -> Path:
        """OUT/checkpoints/latest.pt."""
        return self.out / "checkpoints" / "latest.pt"

    def save_checkpoint(self) -> None:
        """Everything needed to continue exactly (rank 0 writes, atomically)."""
        if self.main:
            state = {
                "format": CKPT_FORMAT,
                "step": self.step,
                "model": self.model.state_dict(),
                "ema": self.ema.state_dict(),
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "recipe": self.recipe.to_dict(),
                "config": json.dumps(self.model.config.to_dict()),
                "rng": rng_state(),
                "data": self.sampler.state(self.micro),
                "micro": self.micro,
                "skipped": self.skipped,
                "rollbacks": self.rollbacks,
                "world": self.world,
            }
            atomic_torch_save(state, self.ckpt_path)
        self.acc.wait_for_everyone()

    def load_checkpoint(self, path: Path | None = None) -> None:
        """Restore a checkpoint written by save_checkpoint (every rank reads the same file)."""
        path = path or self.ckpt_path
        try:
            s = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FlowmapError(f"no checkpoint at {path} to resume from; drop --resume to start a new run.") from None
        except Exception as e:
            raise FlowmapError(
                f"{path} is not a readable checkpoint ({type(e).__name__}: {e}); delete it or start a new --out."
            ) from None
        if s.get("format") != CKPT_FORMAT:
            raise FlowmapError(f"{path} is not a flowmap fine-tuning checkpoint; start a new --out.")
        if s["world"] != self.world or s["recipe"].get("batch_size") != self.recipe.batch_size:
            raise FlowmapError(
                f"{path} was written with {s['world']} processes and batch {s['recipe'].get('batch_size')}; resume with the same settings."
            )
        self.model.load_state_dict(s["model"])
        self.ema.load_state_dict(s["ema"])
        self.opt.load_state_dict(s["optimizer"])
        self.sched.load_state_dict(s["scheduler"])
        set_rng_state(s["rng"])
        self.step, self.skipped, self.rollbacks = int(s["step"]), int(s["skipped"]), int(s["rollbacks"])
        self.micro = int(s["micro"])
        self.bad_run = 0

    def rollback(self) -> None:
        """After max_bad_steps non-finite steps in a row: back to the last good checkpoint, with fresh random numbers."""
        bad_at = self.step + 1
        if not self.ckpt_path.exists():
            raise FlowmapError(
                f"{self.bad_run} non-finite steps in a row at step {bad_at} and no checkpoint to roll back to; lower --lr, "
                "use --loss adaptive or set --checkpoint-every."
            )
        rollbacks, skipped, micro = self.rollbacks + 1, self.skipped, self.micro
        if rollbacks > MAX_ROLLBACKS:
            raise FlowmapError(
                f"training kept diverging after {MAX_ROLLBACKS} rollbacks (last at step {bad_at}); lower --lr or --mg-scale."
            )
        self.load_checkpoint()
        self.rollbacks = rollbacks  # new random numbers from here on, so the same bad batch is not replayed
        self.skipped = skipped  # skipped steps stay counted across the rollback
        self.micro = micro  # and the data keeps moving forward past the batches that went wrong
        self.say(
            f"[yellow]warning:[/] {self.recipe.max_bad_steps} non-finite steps in a row at step {bad_at}; rolled back to the checkpoint at step {self.step} (rollback {rollbacks}/{MAX_ROLLBACKS})."
        )

    # -------------------------------------------------------------- logging
    def say(self, msg: str) -> None:
        """Print on the main process only."""
        if self.main:
            if self.console is not None:
                self.console.print(msg, highlight=False)
            else:
                print(msg, file=sys.stderr)

    def _metrics_file(self, resume_step: int):
        """metrics.jsonl, truncated to the lines up to resume_step when resuming."""
        path = self.out / "metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step and path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except ValueError:
                    pass
        path.write_text("".join(k + "\n" for k in kept))
        return open(path, "a")

    # -------------------------------------------------------------- main loop
    def run(self, resume: bool = False):
        """Train recipe.steps optimizer steps (continuing a checkpoint when resume), then export; returns the EMA model."""
        rec = self.recipe
        if resume:
            self.load_checkpoint()
            self.say(f"resumed from {self.ckpt_path} at step {self.step}")
        elif self.ckpt_path.exists():  # every rank checks, so none waits at a barrier for a rank that failed
            raise FlowmapError(
                f"{self.out} already holds a run (checkpoints/latest.pt); pass --resume to continue it or choose another --out."
            )
        self.acc.wait_for_everyone()
        mf = self._metrics_file(self.step) if self.main else None
        if self.log_with and self.main:
            self.acc.init_trackers("flowmap-finetune", config={k: str(v) for k, v in rec.to_dict().items()})
        bar = _Bar(self.progress and self.main, rec.steps, self.step)
        t0 = time.perf_counter()
        try:
            while self.step < rec.steps:
                m = self.train_step()
                m["time"] = round(time.perf_counter() - t0, 3)
                m["skipped_total"] = self.skipped
                if mf is not None:
                    mf.write(json.dumps(m) + "\n")
                    mf.flush()
                if self.log_with:
                    self.acc.log({k: v for k, v in m.items() if isinstance(v, (int, float))}, step=m["step"])
                if m.get("skipped"):
                    self.say(
                        f"[yellow]warning:[/] non-finite loss or gradient at step {m['step']}: skipped ({self.skipped} so far)"
                    )
                    if self.bad_run >= rec.max_bad_steps:
                        self.rollback()
                    continue
                bar.update(m)
                if not self.progress and self.main and (self.step % rec.log_every == 0 or self.step == rec.steps):
                    self.say(_fmt(m))
                if rec.checkpoint_every and self.step % rec.checkpoint_every == 0 and self.step < rec.steps:
                    self.save_checkpoint()
                if rec.sample_every and self.step % rec.sample_every == 0 and self.main:
                    self.write_sample_grid(self.out / "samples" / f"step-{self.step:07d}.png")
        finally:
            bar.stop()
            if mf is not None:
                mf.close()
        self.save_checkpoint()
        self.check_replicas()
        if self.log_with:
            self.acc.end_training()
        model = self.export()
        self.acc.wait_for_everyone()
        return model

    # -------------------------------------------------------------- samples and export
    def ema_model(self):
        """A copy of the model carrying the EMA weights."""
        m = copy.deepcopy(self.model).eval()
        self.ema.copy_to(m)
        return m

    def write_sample_grid(self, path: Path, model=None, nfe: int = 1) -> Path:
        """One sample per class (up to 10 classes x 2 rows), 1 and 2 steps, as a PNG grid."""
        from PIL import Image

        from ..export_samples import make_grid, to_pil
        from ..sampling import sample

        model = model or self.ema_model()
        k = min(10, model.config.num_classes)
        rows = [
            sample(model, nfe=n, classes=list(range(k)), num_samples=k, seed=0, device=self.device)
            for n in (nfe, 2 * nfe)
        ]
        path.parent.mkdir(parents=True, exist_ok=True)
        im = to_pil(make_grid(np.concatenate(rows), ncols=k))  # one row per NFE, one column per class
        up = max(1, 64 // model.config.latent.image_size)
        im.resize((im.width * up, im.height * up), Image.NEAREST).save(path)
        return path

    def export(self):
        """EMA weights -> a flowmap model directory at --out (config.training / config.sampling, card, grid); raw weights at --out/raw."""
        from ..card import model_card
        from ..io import write_model_dir

        rec = self.recipe
        model = self.ema_model()
        raw = copy.deepcopy(self.model).eval()
        training = {
            "recipe": rec.to_dict(),
            "objective": rec.objective,
            "steps": self.step,
            "skipped_steps": self.skipped,
            "ema_decay": self.ema.decay,
            "processes": self.world,
            "guidance": {
                "type": "mg" if rec.mg_scale > 0 else "none",
                "mg_scale": rec.mg_scale,
                "guidance_interval": list(rec.guidance_interval),
                "effective_cfg": 1.0 / (1.0 - rec.mg_scale),
            },  # MG fixed point: CFG scale 1 / (1 - omega)
            "data": self.data.name,
            "weights": "ema",
        }
        sampling = {"sampler": "euler", "nfe": 1, "shift": 1.0, "cfg_scale": 1.0}  # guidance is trained in
        for m, w in ((model, "ema"), (raw, "raw")):
            m.config = m.config.replace(training={**training, "weights": w}, sampling=sampling)
        if self.main:
            _export_into(model, self.out, self, model_card, write_model_dir)
            _export_into(raw, self.out / "raw", self, model_card, write_model_dir)
            self.say(f"exported EMA weights to {self.out} and raw weights to {self.out / 'raw'}")
        return model


def _export_into(model, directory: Path, trainer: Trainer, model_card, write_model_dir) -> None:
    """Write a model dir to a temp sibling, then move its files into `directory` one by one (checkpoints stay)."""
    import shutil
    import tempfile

    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export.", dir=directory))
    try:
        if trainer.grid:
            trainer.write_sample_grid(tmp / "grid.png", model=model)
        write_model_dir(model, tmp, card=model_card(model.config, has_grid=trainer.grid))
        for name in (["grid.png"] if trainer.grid else []) + [
            "model.safetensors",
            "README.md",
            "config.json",
        ]:  # config last: is_model_dir flips at the end
            os.replace(tmp / name, directory / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fmt(m: dict) -> str:
    """One console line of metrics."""
    parts = [f"step {m['step']}", f"loss {m['loss']:.4f}", f"grad {m['grad_norm']:.3f}"]
    for k in ("fm", "mf", "cmt", "dudt"):
        if k in m:
            parts.append(f"{k} {m[k]:.4f}")
    return "  ".join(parts)


class _Bar:
    """rich progress bar with loss / grad norm / du/dt in the description (no-op when disabled)."""

    def __init__(self, enabled: bool, total: int, done: int):
        self.p = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.p = Progress(
                TextColumn("fine-tune"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.description}"),
            )
            self.p.start()
            self.task = self.p.add_task("", total=total, completed=done)

    def update(self, m: dict) -> None:
        """Advance one step and show its metrics."""
        if self.p:
            self.p.update(self.task, advance=1, description=_fmt(m))

    def stop(self) -> None:
        """Close the bar."""
        if self.p:
            self.p.stop()


# ---------------------------------------------------------------------------------------------------- dry run
def dry_run(trainer: Trainer, steps: int = 3) -> dict:
    """Run a few steps without writing anything and restore the weights; report sizes, memory and seconds per step."""
    saved = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    opt_state = copy.deepcopy(trainer.opt.state_dict())
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        m = trainer.train_step()
        times.append(time.perf_counter() - t)
    trainer.model.load_state_dict(saved)
    trainer.opt.load_state_dict(opt_state)
    trainer.step = trainer.micro = 0
    per = times[1:] or times
    return {
        "parameters": count_params(trainer.model),
        "peak_memory_bytes": peak_memory_bytes(trainer.device),
        "seconds_per_step": sum(per) / len(per),
        "steps_timed": len(times),
        "last_loss": m["loss"],
        "device": str(trainer.device),
        "processes": trainer.world,
    }
