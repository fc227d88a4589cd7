"""`agecls-train` that SIGKILLs itself as epoch KILL_AT_EPOCH (counted from 0) starts: the previous epochs
are done and checkpointed, nothing ends the MLflow run or the run folder's run.json (a killed job)."""

import os
import signal

import lightning as L

import agecls.training.train as train_module

build_trainer = train_module.build_trainer


class KillAtEpoch(L.Callback):
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == int(os.environ["KILL_AT_EPOCH"]):
            os.kill(os.getpid(), signal.SIGKILL)


def build_killed_trainer(cfg, run_dir, rec, extra_callbacks=None):
    return build_trainer(cfg, run_dir, rec, [*(extra_callbacks or []), KillAtEpoch()])


if __name__ == "__main__":
    train_module.build_trainer = build_killed_trainer
    from agecls.cli.train import main

    main()
