"""The fine-tuning loop: build a run, train it (non-finite skip, rollback, checkpoints, exact resume), export it.

The jobs around the loop live beside it: setup.py (model, trainable part, trackers), distributed.py (Accelerator,
DDP over the loss module), checkpoint.py (checkpoints with checksums, random state), ema.py, export.py.

Design notes
- DDP wraps `LossModule` (the objective around the FlowMap): gradients are all-reduced by DDP's bucketed hooks
  during the backward (skipped with no_sync while accumulating), and every JVP / finite difference runs on the
  plain FlowMap inside it. Replicas start from rank 0's weights and stay bit-identical.
- Every micro-batch draws its data, noise, times and label dropout from its global shard index (data.global_shard)
  and the rollback count, so a resumed run replays exactly the numbers an uninterrupted one would have drawn, and
  P processes x A accumulation steps see exactly the numbers of 1 process x P*A steps.
- Checkpoints are written by rank 0 only (checkpoint.save: checksummed, atomic, the last two kept).
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from ..errors import FlowmapError
from ..outputs import mark_output
from ..progress import Progress, format_seconds
from ..runtime import resolve_device
from . import checkpoint
from .common import Calls, Context
from .data import EpochSampler, check_dataset, global_shard, load_dataset
from .distributed import LossModule, check_replicas, make_accelerator, mean_over_ranks, sync_context, wrap
from .ema import EMA
from .export import export_run, training_record
from .objectives import NEEDS_TEACHER, OBJECTIVE_FNS
from .recipe import Recipe
from .setup import check_trackers, count_params, peak_memory_bytes, prepare_model, set_attention_backend, set_trainable

MAX_ROLLBACKS = 3
ESTIMATE_AFTER = 3  # steps timed before the run prints its estimated time
LINE_EVERY_S = 30.0  # a piped run prints a progress line at least this often, whatever --log-every says


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
        check_trackers(log_with)
        if isinstance(log_with, str):
            log_with = [n.strip() for n in log_with.split(",") if n.strip()]
        self.recipe = recipe
        self.out = Path(out)
        self.acc = make_accelerator(resolve_device(device), log_with, self.out)
        self.device = self.acc.device
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.main = self.acc.is_main_process
        self.log_with = log_with
        self.console = console
        self.grid = grid  # sample grids in the exported directories (off in quick tests)
        self.progress = progress  # None: a bar on a terminal, plain lines when piped; True: bar; False: off
        set_attention_backend(recipe.attention)
        self.bf16 = recipe.precision == "bf16" or (recipe.precision == "auto" and self.device.type == "cuda")

        model, self.depth_origin = prepare_model(model_or_source, recipe)
        self.model = model.to(self.device)
        self.trainable = set_trainable(self.model, recipe.train, recipe.loss)
        self.teacher = None
        if recipe.objective in NEEDS_TEACHER:  # frozen copy of the source before any update (MF-RAE teacher)
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False).velocity
        self.data = load_dataset(data, self.model.config.latent, self.device)
        check_dataset(self.data, self.model.config)
        self.sampler = EpochSampler(len(self.data), recipe.batch_size, recipe.seed)
        # decoder: the encoder runs once without gradient; decoder+time: the timestep embedder's gradient also flows
        # back through the frozen encoder blocks, so the model is called whole
        self.calls = Calls(self.model, decoder_only=recipe.train == "decoder")
        self.ctx = Context(self.calls, recipe, self.model.config.num_classes, self.teacher)
        self.objective = OBJECTIVE_FNS[recipe.objective]
        self.wrapped = wrap(
            self.acc, LossModule(self.model, self.objective, self.ctx)
        )  # DDP broadcasts rank 0's weights
        self.opt = torch.optim.AdamW(
            self.trainable, lr=recipe.lr, betas=tuple(recipe.betas), weight_decay=recipe.weight_decay, eps=1e-8
        )
        warm = max(0, recipe.warmup)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        self.ema = EMA(self.model, recipe.ema_decay(), recipe.ema_warmup)
        self.step = 0
        self.micro = 0  # this process's micro-batches so far, skipped ones included (data and noise move past them)
        self.skipped = 0
        self.rollbacks = 0
        self.bad_run = 0

    # -------------------------------------------------------------- one optimizer step
    def train_step(self) -> dict:
        """Accumulate grad_accum micro-batches (DDP reduces on the last), clip, and step unless something is non-finite."""
        rec = self.recipe
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        self.wrapped.train()
        totals: dict[str, float] = {}
        loss_sum = 0.0
        for a in range(rec.grad_accum):
            shard = global_shard(self.micro, self.world, self.rank, rec.grad_accum)
            self.micro += 1
            gen = checkpoint.step_generator(rec.seed, shard, self.rollbacks)
            x0, y = self.data.get(self.sampler.indices(shard), gen)
            x0, y = x0.to(self.device), y.to(self.device)
            with sync_context(self.acc, self.wrapped, last_micro=a == rec.grad_accum - 1):
                with autocast:
                    loss, metrics = self.wrapped(x0, y, gen)
                (loss.float() / rec.grad_accum).backward()
            loss_sum += loss.item() / rec.grad_accum
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v / rec.grad_accum
        for p in self.trainable:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        clip = rec.grad_clip if rec.grad_clip > 0 else float("inf")
        gnorm = float(torch.nn.utils.clip_grad_norm_(self.trainable, clip))  # the same on every rank after DDP
        keys = sorted(totals)
        reduced = mean_over_ranks([loss_sum, gnorm] + [totals[k] for k in keys], self.world, self.device)
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
    def ckpt_dir(self) -> Path:
        """OUT/checkpoints (latest.pt and previous.pt)."""
        return self.out / "checkpoints"

    @property
    def ckpt_path(self) -> Path:
        """OUT/checkpoints/latest.pt."""
        return self.ckpt_dir / checkpoint.LATEST

    def save_checkpoint(self) -> None:
        """Everything needed to continue exactly (rank 0 writes; every rank learns whether it worked)."""
        err = None
        if self.main:
            state = {
                "format": checkpoint.CKPT_FORMAT,
                "step": self.step,
                "model": self.model.state_dict(),
                "ema": self.ema.state_dict(),
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "recipe": self.recipe.to_dict(),
                "config": json.dumps(self.model.config.to_dict()),
                "rng": checkpoint.rng_state(),
                "data": self.sampler.state(self.micro * self.world),
                "micro": self.micro,
                "skipped": self.skipped,
                "rollbacks": self.rollbacks,
                "world": self.world,
            }
            try:
                checkpoint.save(state, self.ckpt_dir)
            except FlowmapError as e:
                err = e
        failed = mean_over_ranks([0.0 if err is None else 1.0], self.world, self.device)[0] > 0
        if err is not None:
            raise err
        if failed:
            raise FlowmapError(f"rank 0 could not write {self.ckpt_path}; see its message above.")

    def load_checkpoint(self) -> None:
        """Restore the newest checkpoint after verifying its checksum (every rank reads the same file)."""
        s = checkpoint.load_verified(self.ckpt_dir)
        rec, old = self.recipe, s["recipe"]
        if (
            s["world"] != self.world
            or old.get("batch_size") != rec.batch_size
            or old.get("grad_accum") != rec.grad_accum
        ):
            raise FlowmapError(
                f"{self.ckpt_path} was written with {s['world']} processes, batch {old.get('batch_size')} and "
                f"--grad-accum {old.get('grad_accum')}; resume with the same settings."
            )
        self.model.load_state_dict(s["model"])
        self.ema.load_state_dict(s["ema"])
        self.opt.load_state_dict(s["optimizer"])
        self.sched.load_state_dict(s["scheduler"])
        checkpoint.set_rng_state(s["rng"])
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
        """Print on the main process only (through the live progress bar when one is drawn: it clears its line)."""
        if self.main:
            bar = getattr(self, "_live_bar", None)
            if bar is not None and bar.mode == "bar":
                bar.print(msg, markup=True)
            elif self.console is not None:
                self.console.print(msg, highlight=False, soft_wrap=True)
            else:
                print(msg, file=sys.stderr)

    def plan(self) -> str:
        """What this run will do, in one line (model, split and its origin, steps, batch, device)."""
        c, rec = self.model.config, self.recipe
        p = count_params(self.model)
        accum = f" x {rec.grad_accum} accumulated" if rec.grad_accum > 1 else ""
        if self.world > 1:
            accum += f" ({type(self.wrapped).__name__}, {torch.distributed.get_backend()})"
        return (
            f"fine-tune: {rec.objective} on {p['total']:,} parameters ({p['trainable']:,} trainable, --train {rec.train}), "
            f"depth {self.model.depth} of {c.num_blocks} ({self.depth_origin}), {rec.steps} steps, batch {rec.batch_size} "
            f"x {self.world} process(es){accum}, {self.device}{', bf16' if self.bf16 else ''}"
        )

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

    def _progress(self) -> Progress:
        """The step reporter: a bar on a terminal, plain lines (total, s/step, ETA, loss) when piped."""
        tty = self.progress is True or (self.progress is None and sys.stderr.isatty())
        mode = "bar" if self.main and tty else "off"  # piped: the loop prints Progress.line() itself (with grad)
        return Progress(self.recipe.steps, "fine-tune", "step", mode=mode, start=self.step)

    # -------------------------------------------------------------- main loop
    def run(self, resume: bool = False):
        """Train recipe.steps optimizer steps (continuing a checkpoint when resume), then export; returns the EMA model."""
        try:
            return self._run(resume)
        except OSError as e:  # a write that failed outside checkpoint.save (metrics, samples, export)
            raise checkpoint.disk_error(e, Path(e.filename) if e.filename else self.out) from None

    def _run(self, resume: bool):
        rec = self.recipe
        if resume:
            self.load_checkpoint()
            self.say(f"resumed from {self.ckpt_path} at step {self.step}")
        elif checkpoint.any_checkpoint(self.ckpt_dir):  # every rank checks: none waits at a barrier for a failed one
            raise FlowmapError(
                f"{self.out} already holds a run (checkpoints/); pass --resume to continue it or choose another --out."
            )
        if self.main:  # the run directory says it is ours, so a later run may reuse it and nothing else is touched
            self.out.mkdir(parents=True, exist_ok=True)
            mark_output(self.out, "run", files=[])
        self.acc.wait_for_everyone()
        mf = self._metrics_file(self.step) if self.main else None
        if self.log_with and self.main:
            self.acc.init_trackers("flowmap-finetune", config={k: str(v) for k, v in rec.to_dict().items()})
        start = self.step
        t0 = last_line = time.perf_counter()
        try:
            with self._progress() as bar:
                self._live_bar = bar
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
                            bar.done = self.step
                        continue
                    bar.advance(1, loss=round(m["loss"], 4))
                    if self.step - start == ESTIMATE_AFTER and self.step < rec.steps:
                        self.say(
                            f"estimated time: {format_seconds(bar.eta)} for the remaining {rec.steps - self.step} steps "
                            f"({1 / bar.rate if bar.rate else float('nan'):.2f} s/step)"
                        )
                    due = self.step % rec.log_every == 0 or self.step == rec.steps
                    if bar.mode != "bar" and (due or time.perf_counter() - last_line >= LINE_EVERY_S):
                        self.say(f"{bar.line()}, grad {m['grad_norm']:.3f}" + _extra(m))
                        last_line = time.perf_counter()
                    if rec.checkpoint_every and self.step % rec.checkpoint_every == 0 and self.step < rec.steps:
                        self.save_checkpoint()
                    if rec.sample_every and self.step % rec.sample_every == 0 and self.main:
                        from .export import ema_model, write_sample_grid

                        path = self.out / "samples" / f"step-{self.step:07d}.png"
                        write_sample_grid(ema_model(self.model, self.ema), path, self.device)
        finally:
            self._live_bar = None
            if mf is not None:
                mf.close()
        self.save_checkpoint()
        digest = check_replicas(self.model, self.world, self.step)
        if digest:
            self.say(f"replicas identical across {self.world} processes (sha256 {digest[:12]})")
        if self.log_with:
            self.acc.end_training()
        model = self.export()
        self.acc.wait_for_everyone()
        return model

    def export(self):
        """EMA weights -> a flowmap model dir at --out, raw weights at --out/raw (rank 0 writes); the EMA model."""
        rec = self.recipe
        training = training_record(rec, self.step, self.skipped, self.ema.decay, self.world, self.data.name)
        model = export_run(self.model, self.ema, training, self.out, self.device, self.grid, write=self.main)
        if self.main:
            self.say(f"exported EMA weights to {self.out} and raw weights to {self.out / 'raw'}")
        return model


def _extra(m: dict) -> str:
    """The objective's own metrics for a log line."""
    return "".join(f", {k} {m[k]:.4f}" for k in ("fm", "mf", "cmt", "dudt") if k in m)


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
        "batch_size": trainer.recipe.batch_size,
    }
