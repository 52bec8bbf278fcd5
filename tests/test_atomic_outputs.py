"""Outputs are atomic: a crash while writing a stage output or a checkpoint leaves either the
previous complete one or nothing, never a partial directory or file the next step would use."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

import rlhf.outputs
from rlhf.data.datamodules import DemonstrationDataModule
from rlhf.data.sources import DataSource
from rlhf.interrupts import CheckpointOnInterrupt
from rlhf.models.loading import LoraSettings, ModelSettings
from rlhf.outputs import (
    AtomicCheckpointIO,
    OutputDirError,
    atomic_directory,
    atomic_file,
    read_stage_marker,
)
from rlhf.resume import RunContinuity, make_resumable
from rlhf.sft import SFTModule


class Crash(RuntimeError):
    pass


def test_atomic_file_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "last.ckpt"
    with atomic_file(target) as tmp:
        tmp.write_bytes(b"complete v1")
    with pytest.raises(Crash), atomic_file(target) as tmp:
        tmp.write_bytes(b"half of v")
        raise Crash
    assert target.read_bytes() == b"complete v1"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_checkpoint_io_crash_mid_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)
    real_save = torch.save

    def save_half_then_crash(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as handle:
            handle.truncate(10)  # a torn write
        raise Crash("killed while writing")

    monkeypatch.setattr(rlhf.outputs.torch, "save", save_half_then_crash)
    with pytest.raises(Crash):
        io.save_checkpoint({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_rlhf_fit_trainers_write_checkpoints_atomically(tmp_path):
    trainer = L.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path)
    make_resumable(trainer)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert sum(isinstance(cb, (RunContinuity, CheckpointOnInterrupt)) for cb in trainer.callbacks) == 2


def test_crash_while_saving_a_stage_output_leaves_no_partial_directory(tmp_path, tiny_model_dir, monkeypatch):
    out = tmp_path / "sft_out"
    with atomic_directory(out) as tmp:  # a complete output of an earlier run
        (tmp / "model").mkdir()
        rlhf.outputs.write_stage_marker(tmp, {"stage": "sft", "run": "earlier"})

    rows = [{"prompt": f"q{i}", "response": f"answer {i}"} for i in range(4)]
    (tmp_path / "demos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = DemonstrationDataModule(train=DataSource(str(tmp_path / "demos.jsonl")), val_fraction=0.0,
                                   batch_size=2, max_length=32, max_prompt_length=16)
    module = SFTModule(ModelSettings(str(tiny_model_dir), lora=LoraSettings(r=4)), output_dir=str(out))

    def crash(directory, info):
        assert (directory / "model").is_dir()  # the weights are written by now
        raise Crash("killed before the marker")

    monkeypatch.setattr("rlhf.sft.module.write_stage_marker", crash)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    with pytest.raises(Crash):
        trainer.fit(module, datamodule=data)
    assert read_stage_marker(out) == {"stage": "sft", "run": "earlier"}  # untouched
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_temporaries_of_killed_saves_are_removed_by_the_next_save(tmp_path):
    """``kill -9`` mid-save leaves ``.<name>.tmp-*`` (and, between the two renames of a
    directory, ``.<name>.old-*``) next to the target; the next save of it removes them."""
    checkpoint, output = tmp_path / "last.ckpt", tmp_path / "out"
    (tmp_path / ".last.ckpt.tmp-0badf00d").write_bytes(b"half a checkpoint")
    for stale in (".out.tmp-0badf00d", ".out.old-0badf00d"):
        (tmp_path / stale / "model").mkdir(parents=True)
    (tmp_path / ".other.tmp-0badf00d").write_bytes(b"another target's")
    with atomic_file(checkpoint) as tmp:
        tmp.write_bytes(b"complete")
    with atomic_directory(output) as tmp:
        (tmp / "weights").write_bytes(b"complete")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-0badf00d", "last.ckpt", "out"]


def test_a_directory_holding_another_stage_output_is_not_replaced(tmp_path):
    inner = tmp_path / "outputs" / "rm"
    inner.mkdir(parents=True)
    rlhf.outputs.write_stage_marker(inner, {"stage": "rm"})
    with pytest.raises(OutputDirError, match=f"holds another stage's output {inner}"), \
            atomic_directory(tmp_path / "outputs"):
        pass
    assert read_stage_marker(inner) == {"stage": "rm"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]
