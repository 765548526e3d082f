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
