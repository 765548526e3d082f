"""A resumed run reads its checkpoint through a file mapping and hands each page back once the tensor is copied
(checkpoint.release / to_memory, docs/memory.md): the process's file-backed resident memory must not keep a second
copy of the states, and the values must survive the round trip exactly."""

import sys

import pytest
import torch

from flowmap_convert.finetuning import checkpoint
from flowmap_convert.finetuning.memory import status_bytes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")

MB = 2**20


def rss_file() -> int:
    """File-backed resident bytes of this process."""
    v = status_bytes("RssFile")
    assert v is not None, "no RssFile line in /proc/self/status"
    return v


def rss_anon() -> int:
    """Anonymous resident bytes of this process."""
    v = status_bytes("RssAnon")
    assert v is not None, "no RssAnon line in /proc/self/status"
    return v


def state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(2048, 2048, generator=g)  # 16 MiB each
    return {
        "format": checkpoint.CKPT_FORMAT,
        "model": {"w": w},
        "ema": {"shadow": {"w": w * 0.5}, "updates": 3, "decay": 0.99},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": w * 0.25, "exp_avg_sq": w.abs()}}},
        "step": 3,
    }


def test_reading_a_checkpoint_leaves_no_mapped_copy_resident(tmp_path):
    s0 = state(0)
    checkpoint.save(dict(s0), tmp_path)
    path = tmp_path / checkpoint.LATEST
    size = path.stat().st_size
    assert size > 60 * MB

    before = rss_file()
    s = checkpoint.read(path)  # verifies the sha256 over every tensor: reads the whole file
    after_read = rss_file()
    assert checkpoint.mapped_ranges(path), "the checkpoint is read through a file mapping"
    # without the release every page hashed stays resident: the whole file
    assert after_read - before < 0.25 * size, f"{(after_read - before) / MB:.0f} MiB of the file stay resident"

    w = torch.empty(2048, 2048)
    w.copy_(s["model"]["w"])
    checkpoint.release(s["model"], path)
    opt = checkpoint.to_memory(s["optimizer"], path)
    assert rss_file() - before < 0.25 * size

    # the values are the saved ones, and the optimizer's copies live outside the mapping
    assert torch.equal(w, s0["model"]["w"])
    for k in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(opt["state"][0][k], s0["optimizer"]["state"][0][k])
    lo_hi = checkpoint.mapped_ranges(path)
    ptr = opt["state"][0]["exp_avg"].untyped_storage().data_ptr()
    assert not any(lo <= ptr < hi for lo, hi in lo_hi)
    # a page handed back is read from the file again on the next access: still the same bytes
    assert torch.equal(s["ema"]["shadow"]["w"], s0["ema"]["shadow"]["w"])


def test_release_never_touches_memory_outside_the_mapping(tmp_path):
    checkpoint.save(state(1), tmp_path)
    path = tmp_path / checkpoint.LATEST
    s = checkpoint.read(path)
    own = torch.randn(1024, 1024)  # anonymous memory: a release must leave it alone
    ref = own.clone()
    checkpoint.release({"x": own, "m": s["model"]}, path)
    assert torch.equal(own, ref)
    checkpoint.release({"x": own}, tmp_path / "elsewhere.pt")  # no mapping of that file: nothing to drop
    assert torch.equal(own, ref)


def test_resuming_leaves_a_file_backed_frozen_weight_file_backed(tmp_path):
    """A decoder-only run's frozen weights are the source export's safetensors, loaded lazily: a resume that wrote
    the (equal) saved values into them made an anonymous copy of every frozen weight (+3.7 GiB at DiT^DH-XL)."""
    from safetensors.torch import load_file, save_file

    save_file({"frozen": torch.randn(4096, 2048), "trained": torch.randn(256, 256)}, str(tmp_path / "src.safetensors"))
    src = load_file(str(tmp_path / "src.safetensors"))
    module = torch.nn.Module()
    module.frozen = torch.nn.Parameter(src["frozen"], requires_grad=False)
    module.trained = torch.nn.Parameter(src["trained"].clone())
    saved = {"frozen": src["frozen"].clone(), "trained": module.trained.detach() + 1.0}
    checkpoint.save({"format": checkpoint.CKPT_FORMAT, "model": saved, "step": 1}, tmp_path / "ck")
    path = tmp_path / "ck" / checkpoint.LATEST
    s = checkpoint.read(path)
    del saved

    before = rss_anon()
    checkpoint.load_into(module, s["model"], path)
    grown = rss_anon() - before
    assert torch.equal(module.trained, s["model"]["trained"])  # what changed is written
    assert torch.equal(module.frozen, s["model"]["frozen"])
    assert grown < 8 * MB, f"the equal frozen weight became {grown / MB:.0f} MiB of anonymous memory"
    with pytest.raises(RuntimeError, match="Missing key"):  # strict, as load_state_dict
        checkpoint.load_into(module, {"trained": s["model"]["trained"]}, path)
