"""``python -m rlhf.fit --config configs/....yaml``: one entry point for every stage.

The stage is the config's ``model.class_path`` (SFT, reward model, PPO) and its data module the
``data.class_path``; everything else is Lightning's ``Trainer``. Any key can be overridden on
the command line in the W&B agent's style, e.g. ``--model.init_args.lr=1e-4``. Resume a run
with ``--ckpt_path last`` (or a path).
"""

from __future__ import annotations

import logging

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from rlhf.console import quiet_known_warnings, use_compact_model_summary
from rlhf.interrupts import interrupt_exit_code
from rlhf.launch import guard_launch
from rlhf.resume import make_resumable, prepare_resume
from rlhf.run_info import RunInfoCallback


class RLHFCLI(LightningCLI):
    """LightningCLI that always fits, with ``--ckpt_path`` for resuming."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 (jsonargparse parser)
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="checkpoint to resume from: a path, or 'last' for the run's last checkpoint",
        )
        parser.add_argument(
            "--validate_before_fit",
            type=bool,
            default=False,
            help="run the validation loop once before training (logs the step-0 baseline)",
        )

    def instantiate_classes(self) -> None:
        """As LightningCLI's, but an error raised in a class's ``__init__`` (a missing model,
        a tokenizer without EOS, ...) surfaces as itself, not wrapped in jsonargparse's "Does
        not validate against any of the Union subtypes" and a dump of the config."""
        try:
            super().instantiate_classes()
        except ValueError as err:
            if err.__cause__ is None:
                raise
            raise err.__cause__ from None


def main(args: list[str] | None = None) -> RLHFCLI:
    """Parse the config, build trainer/module/data, and fit."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_known_warnings()
    cli = RLHFCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=args,
        save_config_callback=RunInfoCallback,  # config.yaml, git commit, W&B config
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_kwargs={"description": __doc__.split("\n\n")[0]},
    )
    # Multi-process launches: the config must match the launcher, the rendezvous is bounded.
    guard_launch(cli.trainer)
    # Checkpoints carry RNG and logger identity, SIGTERM/Ctrl-C save one, files are atomic;
    # "last" is found and the loggers continue the checkpoint's run (rlhf.resume).
    make_resumable(cli.trainer)
    use_compact_model_summary(cli.trainer)
    ckpt_path = prepare_resume(cli.trainer, cli.config.ckpt_path)
    try:
        if cli.config.validate_before_fit and ckpt_path is None:
            # Loggers are detached here; the module logs these numbers at step 0 of the fit.
            loggers, cli.trainer.loggers = cli.trainer.loggers, []
            cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
            cli.trainer.loggers = loggers
            cli.model.metrics_before_fit = cli.model.logged_metrics()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:  # a checkpoint was saved (rlhf.interrupts); exit 128 + signal
        raise SystemExit(interrupt_exit_code(cli.trainer)) from None
    return cli


if __name__ == "__main__":
    main()  # LightningCLI reads sys.argv itself (passing it too makes Lightning warn)
