"""What makes conversion fast must not change results: mapped reads, a build without initialisation."""

from __future__ import annotations

import argparse

import torch
from flowmap_convert.adapters.checkpoint import read_checkpoint


def small_sd():
    g = torch.Generator().manual_seed(0)
    return {"blocks.0.w": torch.randn(8, 8, generator=g), "blocks.0.b": torch.randn(8, generator=g)}


def test_selected_weights_survive_the_file_being_overwritten_in_place(tmp_path):
    sd = small_sd()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {k: v * 0 for k, v in sd.items()}, "ema": sd, "opt": {}, "args": argparse.Namespace()}, path)
    ckpt = read_checkpoint(path)
    with open(path, "wb") as f:  # truncates the same inode a mapping would still point at
        f.write(b"\0" * 16)
    assert ckpt.weights == "ema" and all(torch.equal(ckpt.state_dict[k], sd[k]) for k in sd)


def test_legacy_non_zip_checkpoints_still_load(tmp_path):
    sd = small_sd()
    path = tmp_path / "legacy.pt"
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    ckpt = read_checkpoint(path)
    assert ckpt.weights == "plain" and all(torch.equal(ckpt.state_dict[k], sd[k]) for k in sd)


def test_building_without_initialisation_restores_torch_init(tmp_path):
    from dit_reference import make_sd

    import flowmap_convert as fm

    before = (torch.nn.init.normal_, torch.nn.init.xavier_uniform_, torch.nn.Linear.reset_parameters)
    sd = make_sd(hidden=64, blocks=2, channels=4, patch=2, size=8, classes=10)
    torch.save(sd, tmp_path / "repa.pt")
    model = fm.convert(str(tmp_path / "repa.pt"), depth=1, family="repa", num_heads=4)
    assert all(not p.is_meta for p in model.parameters())
    assert torch.equal(model.net.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])
    assert (torch.nn.init.normal_, torch.nn.init.xavier_uniform_, torch.nn.Linear.reset_parameters) == before
    assert "reset_parameters" not in vars(torch.nn.Conv2d)  # inherited again, not left patched on the subclass
    assert torch.nn.Linear(16, 16).weight.abs().sum() > 0  # initialisation works again after the build


def test_mapped_read_returns_the_same_weights_without_copying(tmp_path):
    sd = small_sd()
    path = tmp_path / "ckpt.pt"
    torch.save({"ema": sd, "opt": {"step": torch.zeros(1)}}, path)
    mapped, copied = read_checkpoint(path, mapped=True), read_checkpoint(path)
    assert all(torch.equal(mapped.state_dict[k], copied.state_dict[k]) for k in sd)
    path.write_bytes(b"\0" * 16)  # only the mapped weights follow the file
    assert all(torch.equal(copied.state_dict[k], sd[k]) for k in sd)
    assert not all(torch.equal(mapped.state_dict[k], sd[k]) for k in sd)
