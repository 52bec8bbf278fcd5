"""PhaseTimesLogger: each training step's phases become ``time/<phase>_s`` metrics."""

import time

import lightning as L
import torch
from torch.utils.data import DataLoader

from rlhf import timing
from rlhf.timing import PhaseTimesLogger, phase


class Sleeper(L.LightningModule):
    """A step with a 'generation' phase of ~20 ms and an 'update' phase of ~5 ms."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        with phase("generation"):
            time.sleep(0.02)
        with phase("update"):
            time.sleep(0.005)
            loss = self.layer(batch).sum()
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_phase_times_are_logged_per_step(tmp_path):
    rows = []

    class Keep(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[PhaseTimesLogger(), Keep()])
    trainer.fit(Sleeper(), DataLoader(torch.ones(3, 1), batch_size=1))
    assert len(rows) == 3
    for row in rows:
        assert 0.02 <= row["time/generation_s"] < row["time/iteration_s"]
        assert 0.005 <= row["time/update_s"] < row["time/generation_s"]
    assert timing.active() is None  # the recorder is gone after the step
