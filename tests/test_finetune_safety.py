"""`flowmap finetune` refuses bad input in one line before writing anything, and never trains from a bad checkpoint:
checksummed checkpoints (the last two kept), every number checked up front, --out checks, disk full."""

from __future__ import annotations

import errno
import os
import re

import numpy as np
import pytest
import torch
from conftest import randomize, tiny_config
from typer.testing import CliRunner

from flowmap_convert.errors import FlowmapError


@pytest.fixture
def base(tmp_path):
    """A tiny exported model and a 32-sample npz dataset."""
    from flowmap_convert.io import export
    from flowmap_convert.model import FlowMap

    torch.manual_seed(0)
    export(randomize(FlowMap(tiny_config(num_blocks=3)), std=0.05), tmp_path / "base")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 16, 16, generator=g).clamp(-1, 1)
    np.savez(tmp_path / "d.npz", latents=x.numpy(), labels=np.arange(32) % 10)
    return tmp_path


def cli(base, out, *extra):
    from flowmap_convert.cli import app

    args = ["finetune", str(base / "base"), "--data", str(base / "d.npz"), "--depth", "2", "--batch-size", "2"]
    args += ["--out", str(out), "--device", "cpu", "--threads", "1", *extra]
    return CliRunner().invoke(app, args)


def error_line(result) -> str:
    """The one error line of a refused command (exit 2, no traceback)."""
    text = result.output.strip()
    assert result.exit_code == 2, text
    lines = text.splitlines()
    assert "Traceback" not in text and lines[-1].startswith("error:"), text  # progress lines may come before
    assert sum(line.startswith("error:") for line in lines) == 1, text
    return lines[-1]


def refused_up_front(result) -> str:
    """A refusal before any work: the error line is all the command printed."""
    line = error_line(result)
    assert result.output.strip() == line, result.output
    return line


@pytest.mark.e2e
def test_checkpoints_carry_a_checksum_and_the_last_two_are_kept(base):
    from flowmap_convert.finetuning import checkpoint

    r = cli(base, base / "run", "--steps", "4", "--checkpoint-every", "2")
    assert r.exit_code == 0, r.output
    ck = base / "run" / "checkpoints"
    latest, previous = checkpoint.read(ck / "latest.pt"), checkpoint.read(ck / "previous.pt")
    assert (latest["step"], previous["step"]) == (4, 2)
    raw = torch.load(ck / "latest.pt", weights_only=True)
    assert re.fullmatch(r"[0-9a-f]{64}", raw["sha256"])
    assert not [p.name for p in ck.iterdir() if p.name not in ("latest.pt", "previous.pt")]


@pytest.mark.e2e
def test_resume_refuses_a_corrupted_checkpoint_naming_the_previous_good_one(base):
    r = cli(base, base / "run", "--steps", "4", "--checkpoint-every", "2")
    assert r.exit_code == 0, r.output
    path = base / "run" / "checkpoints" / "latest.pt"
    blob = bytearray(path.read_bytes())
    weight = torch.load(path, weights_only=True)["model"]["net.blocks.2.mlp.fc1.weight"]
    at = bytes(blob).find(weight.numpy().tobytes()[:256])  # inside a weight: torch.load alone reads garbage
    assert at > 0
    blob[at + 64 : at + 128] = bytes(b ^ 0xFF for b in blob[at + 64 : at + 128])
    path.write_bytes(bytes(blob))
    before = (base / "run" / "metrics.jsonl").read_text()

    line = refused_up_front(cli(base, base / "run", "--steps", "6", "--checkpoint-every", "2", "--resume"))
    assert "latest.pt is corrupted" in line and "previous.pt (step 2) verifies" in line, line
    assert (base / "run" / "metrics.jsonl").read_text() == before  # nothing trained, nothing rewritten


@pytest.mark.e2e
def test_resume_with_no_good_checkpoint_says_so(base):
    r = cli(base, base / "run", "--steps", "2", "--checkpoint-every", "0")
    assert r.exit_code == 0, r.output
    path = base / "run" / "checkpoints" / "latest.pt"
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(64)
    path.write_bytes(bytes(data))
    line = refused_up_front(cli(base, base / "run", "--steps", "4", "--resume"))
    assert "latest.pt" in line and "no good checkpoint is kept" in line, line


@pytest.mark.e2e
@pytest.mark.parametrize(
    "args, needle",
    [
        (["--lr", "inf"], "--lr must be a finite number"),
        (["--lr", "nan"], "--lr must be a finite number"),
        (["--lr", "0"], "--lr must be > 0"),
        (["--time-std", "nan"], "--time-std"),
        (["--time-proposal", "nan,0"], "--time-proposal"),
        (["--fm-mean", "inf"], "--fm-mean"),
        (["--time-shift", "0"], "--time-shift must be > 0"),
        (["--grad-clip", "nan"], "--grad-clip"),
        (["--log-every", "0"], "--log-every must be an integer >= 1"),
        (["--seed", "1e20"], "--seed must be an integer in [0, 9223372036854775807]"),
        (["--seed", str(2**63)], "--seed must be an integer in [0, 9223372036854775807]"),
        (["--seed", "-1"], "--seed"),
        (["--device", "bogus"], "unknown --device 'bogus'"),
        (["--device", "meta"], "--device meta is not supported"),
        (["--ema", "nan"], "--ema"),
        (["--ema", "1.5"], "--ema must be < 1"),
        (["--mg-scale", "1"], "--mg-scale"),
        (["--label-dropout", "nan"], "--label-dropout"),
        (["--fd-delta", "0"], "--fd-delta"),
        (["--guidance-interval", "0.8,0.2"], "--guidance-interval"),
        (["--threads", "0"], "--threads"),
        (["--steps", "0"], "--steps"),
        (["--checkpoint-every", "-1"], "--checkpoint-every"),
    ],
)
def test_every_bad_number_is_one_line_before_the_run_directory_exists(base, args, needle):
    out = base / "run"
    line = refused_up_front(cli(base, out, *args))
    assert needle in line, line
    assert not out.exists()


@pytest.mark.e2e
def test_out_that_is_a_file_is_refused(base):
    f = base / "taken"
    f.write_text("keep me")
    assert "is a file" in refused_up_front(cli(base, f, "--steps", "1"))
    assert f.read_text() == "keep me"
    assert "is a file" in refused_up_front(cli(base, f / "run", "--steps", "1"))


@pytest.mark.e2e
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_out_in_a_read_only_directory_is_refused(base):
    ro = base / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert "is not writable" in refused_up_front(cli(base, ro / "run", "--steps", "1"))
        assert not (ro / "run").exists()
    finally:
        ro.chmod(0o755)


@pytest.mark.e2e
def test_out_not_writable_is_refused_by_the_run_dir_hook(base, monkeypatch):
    from flowmap_convert import finetuning

    monkeypatch.setattr(finetuning.os, "access", lambda path, mode: False)
    assert "is not writable" in refused_up_front(cli(base, base / "run", "--steps", "1"))
    assert not (base / "run").exists()


@pytest.mark.e2e
def test_disk_full_while_checkpointing_is_one_line_and_leaves_no_half_written_file(base, monkeypatch):
    from flowmap_convert.finetuning import checkpoint

    real_save, calls = torch.save, {"n": 0}

    def full_disk(obj, f, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: half a file, then the disk is full
            f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    line = error_line(cli(base, base / "run", "--steps", "6", "--checkpoint-every", "2"))
    assert "No space left on device" in line and "free some disk space" in line and "--resume" in line, line
    ck = base / "run" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["latest.pt"]  # no temporary file left behind
    assert checkpoint.read(ck / "latest.pt")["step"] == 2  # the last good checkpoint, intact


@pytest.mark.e2e
def test_disk_full_outside_checkpoints_is_one_line(base, monkeypatch):
    from flowmap_convert.finetuning import trainer

    def full(self, resume_step):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.out / "metrics.jsonl"))

    monkeypatch.setattr(trainer.Trainer, "_metrics_file", full)
    line = error_line(cli(base, base / "run", "--steps", "1"))
    assert "No space left on device" in line and "metrics.jsonl" in line, line


def test_latest_checkpoint_exists_at_every_moment_of_a_save(tmp_path, monkeypatch):
    from flowmap_convert.finetuning import checkpoint

    def state(step):
        return {"format": checkpoint.CKPT_FORMAT, "step": step, "w": torch.full((3,), float(step))}

    checkpoint.save(state(1), tmp_path)
    seen, real = [], os.replace

    def replace(src, dst):
        seen.append((tmp_path / "latest.pt").exists())  # a kill here must still find a latest.pt
        real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    checkpoint.save(state(2), tmp_path)
    assert seen and all(seen)
    assert checkpoint.read(tmp_path / "latest.pt")["step"] == 2
    assert checkpoint.read(tmp_path / "previous.pt")["step"] == 1
    assert torch.equal(checkpoint.read(tmp_path / "previous.pt")["w"], torch.ones(3))


@pytest.mark.e2e
def test_a_new_run_into_a_run_directory_is_refused_up_front(base):
    r = cli(base, base / "run", "--steps", "2")
    assert r.exit_code == 0, r.output
    before = (base / "run" / "metrics.jsonl").read_text()
    line = refused_up_front(cli(base, base / "run", "--steps", "2"))
    assert "already holds a run" in line and "--resume" in line
    assert (base / "run" / "metrics.jsonl").read_text() == before


@pytest.mark.e2e
def test_finetune_never_writes_into_a_users_folder(base, tmp_path):
    """`finetune --out u` on a folder of the user's (README.md, config.json) refuses and changes nothing."""
    user = tmp_path / "u"
    user.mkdir()
    (user / "README.md").write_text("my notes\n")
    (user / "config.json").write_text("{}\n")
    before = {p.name: p.read_bytes() for p in user.iterdir()}
    line = error_line(cli(base, user, "--steps", "1"))
    assert "not a fine-tune run" in line and "nothing was changed" in line, line
    assert {p.name: p.read_bytes() for p in user.iterdir()} == before


def test_exported_weights_are_readable_by_the_group(tmp_path):
    import flowmap_convert as fm
    from flowmap_convert.io import export

    out = export(fm.load("builtin:digits-sit"), tmp_path / "m")
    mode = (out / "model.safetensors").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask, oct(mode)


# ---------------------------------------------------------------------------------------------------- lose nothing
def test_a_users_edited_card_in_a_run_directory_is_never_overwritten(base):
    run = base / "run"
    assert cli(base, run, "--steps", "2").exit_code == 0
    import json

    marker = json.loads((run / ".flowmap-output.json").read_text())
    assert {"README.md", "config.json", "model.safetensors", "raw/config.json"} <= set(marker["hashes"])
    (run / "README.md").write_text("# my notes on this run\n")
    line = refused_up_front(cli(base, run, "--steps", "4", "--resume"))
    assert "README.md" in line and "never overwrites" in line, line
    assert (run / "README.md").read_text() == "# my notes on this run\n"


def test_a_run_directory_holding_a_link_is_refused_and_its_target_untouched(base, tmp_path):
    run = base / "run"
    assert cli(base, run, "--steps", "2").exit_code == 0
    elsewhere = tmp_path / "elsewhere.jsonl"
    elsewhere.write_text("precious\n")
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(elsewhere)
    line = refused_up_front(cli(base, run, "--steps", "4", "--resume"))
    assert "symbolic links (metrics.jsonl)" in line, line
    assert elsewhere.read_text() == "precious\n"
    from flowmap_convert.outputs import open_append

    with pytest.raises(FlowmapError, match="symbolic link"):  # and the writer itself never follows one
        open_append(run / "metrics.jsonl", truncate=True)
    assert elsewhere.read_text() == "precious\n"


def test_the_checkpoint_cadence_never_exceeds_the_run():
    from flowmap_convert.finetuning.recipe import Recipe
    from flowmap_convert.finetuning.trainer import checkpoint_cadence

    assert checkpoint_cadence(Recipe(steps=200, checkpoint_every=500)) == 100
    assert checkpoint_cadence(Recipe(steps=200, checkpoint_every=50)) == 50
    assert checkpoint_cadence(Recipe(steps=200, checkpoint_every=0)) == 0
    assert checkpoint_cadence(Recipe(steps=1, checkpoint_every=500)) == 500  # one step: the final save covers it
    for bad in (float("nan"), -1.0, float("inf")):
        with pytest.raises(FlowmapError, match="checkpoint_minutes"):
            Recipe(checkpoint_minutes=bad)


def test_a_killed_checkpoint_save_leaves_nothing_forever(tmp_path):
    """A save killed half-way leaves a claimed temporary; the next save removes it (a user's look-alike stays)."""
    import json

    from flowmap_convert.finetuning import checkpoint

    dead = tmp_path / ".latest.pt.999999999.ab12.tmp"
    dead.write_bytes(b"half")
    (tmp_path / (dead.name + ".flowmap")).write_text(json.dumps({"flowmap_leftover": dead.name}))
    users = tmp_path / ".latest.pt.999999999.mine.tmp"
    users.write_bytes(b"mine")
    checkpoint.save({"format": checkpoint.CKPT_FORMAT, "step": 1}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["latest.pt", users.name])


@pytest.mark.e2e
def test_sigint_writes_a_checkpoint_at_the_next_step_and_says_where(base):
    """Ctrl-C (or SIGTERM) during the default 500-step cadence: a checkpoint at the next step, --resume continues."""
    import signal
    import subprocess
    import sys
    import time

    from flowmap_convert.finetuning import checkpoint

    run = base / "run"
    args = [sys.executable, "-m", "flowmap_convert.cli", "finetune", str(base / "base"), "--data", str(base / "d.npz")]
    args += ["--depth", "2", "--batch-size", "2", "--steps", "100000", "--out", str(run), "--device", "cpu"]
    args += ["--threads", "1", "--no-grid"] if "--no-grid" in cli_help() else ["--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for sig in (signal.SIGINT, signal.SIGTERM):
        extra = ["--resume"] if sig == signal.SIGTERM else []
        metrics = run / "metrics.jsonl"
        start = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
        proc = subprocess.Popen(args + extra, stderr=subprocess.PIPE, text=True, env=env)
        try:
            for _ in range(1200):  # two new steps: the loop (and its handlers) are running
                if metrics.is_file() and len(metrics.read_text().splitlines()) >= start + 2:
                    break
                time.sleep(0.05)
            proc.send_signal(sig)
            err = proc.communicate(timeout=120)[1]
        finally:
            proc.kill()
        assert proc.returncode == 130, err
        m = re.search(rf"stopped by {sig.name} at step (\d+) of 100000; checkpoint written to (\S+):", err)
        assert m and "Traceback" not in err, err
        assert checkpoint.read(run / "checkpoints" / "latest.pt")["step"] == int(m.group(1)) >= 2


def cli_help() -> str:
    from flowmap_convert.cli import app

    return CliRunner().invoke(app, ["finetune", "--help"]).output
