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

import json
import math
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from ..budget import check_batch
from ..errors import FlowmapError
from ..outputs import changed_files, mark_output, open_append, output_lock
from ..progress import Progress, format_seconds
from ..runtime import resolve_device
from . import checkpoint, memory
from .common import Calls, Context
from .data import EpochSampler, check_dataset, load_dataset
from .distributed import LossModule, check_replicas, make_accelerator, mean_over_ranks, sync_context, wrap
from .ema import EMA
from .export import export_run, training_record, write_sample_grid
from .loader import BatchStream, default_workers
from .memory import frozen_teacher
from .objectives import NEEDS_TEACHER, OBJECTIVE_FNS
from .recipe import Recipe, latent_shift
from .setup import check_trackers, count_params, peak_memory_bytes, prepare_model, set_trainable, with_attention_backend

MAX_ROLLBACKS = 3
ESTIMATE_AFTER = 3  # steps timed before the run prints its estimated time
LINE_EVERY_S = 30.0  # a piped run prints a progress line at least this often, whatever --log-every says
EXPORTED = ("grid.png", "model.safetensors", "README.md", "config.json")  # what export_into writes (and raw/ too)
GROWING = ("metrics.jsonl",)  # files the run rewrites in place: flowmap's while they are plain files


def checkpoint_cadence(recipe) -> int:
    """Steps between checkpoints: recipe.checkpoint_every, but never the run's length or more (a run shorter than
    the cadence still gets a checkpoint half-way, so an interruption loses at most half of it); 0 stays 0."""
    every = recipe.checkpoint_every
    if every and every >= recipe.steps and recipe.steps > 1:
        every = max(1, recipe.steps // 2)
    return every


def check_exported_files(out) -> None:
    """Refuse (one line, nothing changed) when a file the export would replace is not flowmap's unchanged output:
    a README.md the user edited, a link, a file flowmap did not write (flowmap_convert.outputs.changed_files)."""
    out = Path(out)
    names = list(EXPORTED) + [f"raw/{n}" for n in EXPORTED] + list(GROWING)
    theirs = changed_files(out, names) if out.is_dir() else []
    if theirs:
        raise FlowmapError(
            f"{out} holds {', '.join(theirs[:3])}, which flowmap did not write or which changed since; "
            "move it out of the run directory (flowmap never overwrites a file it did not write), then rerun."
        )


class StopSignals:
    """While training: SIGINT / SIGTERM only raise a flag, so the loop stops at the next step boundary with a
    checkpoint; a second signal interrupts at once (main thread only; elsewhere the handlers stay as they are)."""

    def __init__(self):
        self.signum = None
        self.old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self.old[sig] = signal.signal(sig, self._handle)
                except (ValueError, OSError):
                    pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self.old.items():
            signal.signal(sig, old)
        return False


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
        teacher=None,
        workers=None,
    ):
        check_trackers(log_with)
        if isinstance(log_with, str):
            log_with = [n.strip() for n in log_with.split(",") if n.strip()]
        self.out = Path(out)
        self.acc = make_accelerator(resolve_device(device), log_with, self.out)
        self.device = self.acc.device
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        if recipe.batch_size is None:  # a recipe's global batch, split over the processes and accumulation steps
            recipe = recipe.replace(batch_size=recipe.per_process_batch(self.world))
        self.recipe = recipe
        self.main = self.acc.is_main_process
        self.log_with = log_with
        self.console = console
        self.grid = grid  # sample grids in the exported directories (off in quick tests)
        self.progress = progress  # None: a bar on a terminal, plain lines when piped; True: bar; False: off
        self.bf16 = recipe.precision == "bf16" or (recipe.precision == "auto" and self.device.type == "cuda")

        model, self.depth_origin = prepare_model(model_or_source, recipe)
        if recipe.time_shift is None:  # MF-RAE's shift from the latent shape (recipe.latent_shift)
            self.recipe = recipe = recipe.replace(time_shift=latent_shift(model.config))
        # a lower bound (one activation per block), multiplied out before anything of the batch's size exists
        check_batch(model.config, recipe.batch_size, "a fine-tuning batch", 1.0)
        self.model = model.to(self.device)
        self.trainable = set_trainable(self.model, recipe.train, recipe.loss)
        self.teacher_model = None
        if recipe.objective in NEEDS_TEACHER:
            # MF-RAE's teacher is the pretrained flow model the run started from (finetune() passes it, or the model
            # `teacher` names), never the student's own u(x, t, t); without one, a frozen copy of the starting model
            # that shares every tensor the run does not train (finetuning.memory.frozen_teacher)
            if teacher is not None:
                self.teacher_model = teacher.float().to(self.device).eval().requires_grad_(False)
            else:
                self.teacher_model = frozen_teacher(self.model)
        self.teacher = self.teacher_model.velocity if self.teacher_model is not None else None
        self.teacher_source = None  # what the teacher is, for config.training of the export
        self.data = load_dataset(data, self.model.config.latent, self.device)
        check_dataset(self.data, self.model.config)
        self.sampler = EpochSampler(len(self.data), recipe.batch_size, recipe.seed)
        # read ahead by DataLoader workers (pinned on CUDA); the data stay a pure function of the step (loader.py)
        self.workers = default_workers(self.device, self.data) if workers is None else int(workers)
        self.batches = BatchStream(
            self.data,
            self.sampler,
            recipe.seed,
            self.world,
            self.rank,
            recipe.grad_accum,
            self.workers,
            pin=self.device.type == "cuda",
        )
        # decoder: the encoder runs once without gradient; decoder+time: the timestep embedder's gradient also flows
        # back through the frozen encoder blocks, so the model is called whole
        self.calls = Calls(self.model, decoder_only=recipe.train == "decoder")
        self.ctx = Context(self.calls, recipe, self.model.config.num_classes, self.teacher)
        self.objective = OBJECTIVE_FNS[recipe.objective]
        self.wrapped = wrap(
            self.acc, LossModule(self.model, self.objective, self.ctx)
        )  # DDP broadcasts rank 0's weights
        self.opt = torch.optim.AdamW(
            self.trainable,
            lr=recipe.lr,
            betas=tuple(recipe.betas),
            weight_decay=recipe.weight_decay,
            eps=1e-8,
            fused=self.device.type == "cuda" or None,  # fused on CUDA: no full-size temporaries in the step
        )
        warm = max(0, recipe.warmup)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        self.ema = EMA(self.model, recipe.ema_decay(), recipe.ema_warmup)
        self.baseline_bytes = memory.runtime_bytes(self)  # what the process holds besides the run's tensors
        self.step = 0
        self.micro = 0  # this process's micro-batches so far, skipped ones included (data and noise move past them)
        self.skipped = 0
        self.rollbacks = 0
        self.bad_run = 0

    def set_teacher_provenance(self, source: str) -> None:
        """Record where the MFD / CMT teacher came from (written into config.training of the export)."""
        if self.teacher_model is not None:
            self.teacher_source = source

    # -------------------------------------------------------------- one optimizer step
    @with_attention_backend
    def train_step(self) -> dict:
        """Accumulate grad_accum micro-batches (DDP reduces on the last), clip, and step unless something is non-finite."""
        rec = self.recipe
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        self.wrapped.train()
        totals: dict[str, float] = {}
        loss_sum = 0.0
        for a in range(rec.grad_accum):
            x0, y, gen = self.batches.get(self.micro, self.rollbacks)  # global shard of this micro-batch (loader.py)
            self.micro += 1
            x0, y = x0.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
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
                f"`grad_accum` {old.get('grad_accum')}; resume with the same settings."
            )
        # each part is copied into the run's own tensors and its mapped pages dropped before the next is read, so
        # the resume holds one copy of the states, as the run it continues did (docs/memory.md)
        checkpoint.load_into(self.model, s["model"], self.ckpt_path)
        self.ema.load_state_dict(s["ema"])
        checkpoint.release(s["ema"], self.ckpt_path)
        self.opt.load_state_dict(checkpoint.to_memory(s["optimizer"], self.ckpt_path))
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
                f"{self.bad_run} non-finite steps in a row at step {bad_at} and no checkpoint to roll back to; lower `lr`, "
                "use `loss` adaptive or set `checkpoint_every`."
            )
        rollbacks, skipped, micro = self.rollbacks + 1, self.skipped, self.micro
        if rollbacks > MAX_ROLLBACKS:
            raise FlowmapError(
                f"training kept diverging after {MAX_ROLLBACKS} rollbacks (last at step {bad_at}); lower `lr` or `mg_scale`."
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
        """metrics.jsonl, truncated to the lines up to resume_step when resuming (never through a symbolic link)."""
        path = self.out / "metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step and path.is_file() and not path.is_symlink():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except ValueError:
                    pass
        f = open_append(path, truncate=True)
        f.write("".join(k + "\n" for k in kept))
        return f

    def check_exported_files(self) -> None:
        """See `check_exported_files` (module level)."""
        check_exported_files(self.out)

    def _progress(self) -> Progress:
        """The step reporter: a bar on a terminal, plain lines (total, s/step, ETA, loss) when piped."""
        tty = self.progress is True or (self.progress is None and sys.stderr.isatty())
        mode = "bar" if self.main and tty else "off"  # piped: the loop prints Progress.line() itself (with grad)
        return Progress(self.recipe.steps, "fine-tune", "step", mode=mode, start=self.step)

    # -------------------------------------------------------------- main loop
    @with_attention_backend
    def run(self, resume: bool = False):
        """Train recipe.steps optimizer steps (continuing a checkpoint when resume), then export; returns the EMA model.

        Rank 0 holds the run directory's lock throughout (flowmap_convert.outputs.output_lock): a second writer is
        refused at once.
        """
        try:
            with output_lock(self.out) if self.main else nullcontext():
                return self._run(resume)
        except OSError as e:  # a write that failed outside checkpoint.save (metrics, samples, export)
            raise checkpoint.disk_error(e, Path(e.filename) if e.filename else self.out) from None

    def _stop_requested(self, stop: StopSignals) -> bool:
        """True on every rank when any rank got SIGINT / SIGTERM (one all-reduce per step when distributed)."""
        flag = 1.0 if stop.signum is not None else 0.0
        if self.world > 1:
            flag = mean_over_ranks([flag], self.world, self.device)[0]
        return flag > 0

    def _time_due(self, last_save: float) -> bool:
        """The time-based cadence (recipe.checkpoint_minutes), decided by rank 0's clock on every rank."""
        minutes = self.recipe.checkpoint_minutes
        if not minutes:
            return False
        due = 1.0 if time.perf_counter() - last_save >= 60.0 * minutes else 0.0
        if self.world > 1:
            due = mean_over_ranks([due if self.main else 0.0], self.world, self.device)[0]
        return due > 0

    def _run(self, resume: bool):
        rec = self.recipe
        if resume:
            self.load_checkpoint()
            self.say(f"resumed from {self.ckpt_path} at step {self.step}")
        elif checkpoint.any_checkpoint(self.ckpt_dir):  # every rank checks: none waits at a barrier for a failed one
            raise FlowmapError(
                f"{self.out} already holds a run (checkpoints/); pass `resume` to continue it or choose another `out`."
            )
        if self.main:  # the run directory says it is ours, so a later run may reuse it and nothing else is touched
            self.check_exported_files()  # before any step: a user's README.md here would be lost only at the end
            self.out.mkdir(parents=True, exist_ok=True)
            mark_output(self.out, "run", files=[], growing=list(GROWING), update=True)
        self.acc.wait_for_everyone()
        mf = self._metrics_file(self.step) if self.main else None
        if self.log_with and self.main:
            self.acc.init_trackers("flowmap-finetune", config={k: str(v) for k, v in rec.to_dict().items()})
        start = self.step
        t0 = last_line = last_save = time.perf_counter()
        every = checkpoint_cadence(rec)
        try:
            with StopSignals() as stop, self._progress() as bar:
                self._live_bar = bar
                while self.step < rec.steps:
                    if self._stop_requested(stop):
                        self.save_checkpoint()
                        name = signal.Signals(stop.signum).name if stop.signum else "a signal"
                        self.say(
                            f"stopped by {name} at step {self.step} of {rec.steps}; checkpoint written to "
                            f"{self.ckpt_path}: rerun the same command with --resume to continue."
                        )
                        raise KeyboardInterrupt
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
                    if self.step < rec.steps and ((every and self.step % every == 0) or self._time_due(last_save)):
                        self.save_checkpoint()
                        last_save = time.perf_counter()
                    if rec.sample_every and self.step % rec.sample_every == 0 and self.main:
                        path = self.out / "samples" / f"step-{self.step:07d}.png"
                        with torch.no_grad():  # the EMA weights, no copy of them (ema.EMA.model_view)
                            write_sample_grid(self.ema.model_view(self.model), path, self.device)
        finally:
            self.batches.close()  # the data workers are done
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
        if self.teacher_source is not None:
            training["teacher"] = self.teacher_source
        if self.main:
            self.check_exported_files()
        model = export_run(self.model, self.ema, training, self.out, self.device, self.grid, write=self.main)
        if self.main:
            written = [n for n in EXPORTED if (self.out / n).is_file()]
            written += [f"raw/{n}" for n in EXPORTED if (self.out / "raw" / n).is_file()]
            mark_output(self.out, "run", files=written, growing=list(GROWING), update=True)
            self.say(f"exported EMA weights to {self.out} and raw weights to {self.out / 'raw'}")
        return model


def _extra(m: dict) -> str:
    """The objective's own metrics for a log line."""
    return "".join(f", {k} {m[k]:.4f}" for k in ("fm", "mf", "cmt", "dudt") if k in m)


# ---------------------------------------------------------------------------------------------------- dry run
def dry_run(trainer: Trainer, steps: int = 3) -> dict:
    """Run a few steps without writing anything; report sizes, memory (a breakdown) and seconds per step.

    Nothing is copied to be restored: the EMA is not updated, so its shadow still holds the starting trainable
    weights, and they are copied back at the end (a model passed in by the caller comes back as it was; frozen
    tensors never changed). The optimizer's state is dropped.
    """
    times = []
    update, trainer.ema.update = trainer.ema.update, lambda model: None
    try:
        for _ in range(steps):
            t = time.perf_counter()
            m = trainer.train_step()
            times.append(time.perf_counter() - t)
        peak = peak_memory_bytes(trainer.device)
        parts = memory.breakdown(trainer, peak)
    finally:
        trainer.ema.update = update
        trainer.ema.copy_to(trainer.model)
        trainer.opt.state.clear()
    trainer.step = trainer.micro = 0
    per = times[1:] or times
    return {
        "parameters": count_params(trainer.model),
        "peak_memory_bytes": peak,
        "memory": parts,
        "seconds_per_step": sum(per) / len(per),
        "steps_timed": len(times),
        "last_loss": m["loss"],
        "device": str(trainer.device),
        "processes": trainer.world,
        "batch_size": trainer.recipe.batch_size,
    }
