"""Faults a test injects into a training run through the ``callbacks`` group (``+callbacks.<name>._target_=...``),
and a recorder of what one step changed."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback


class NaNLossAt(Callback):
    """Makes the step's loss NaN at the given steps while its gradients stay finite: the NaN is added as a constant
    (``total + nan.detach()``), whose derivative is 0, through a forward hook on the module's loss that runs
    before any other. Fails the run if the gradients of such a step are not all finite (the test would then not
    test a NaN loss with finite gradients)."""

    def __init__(self, steps):
        self.steps = {int(s) for s in steps}
        self._now = -1

    def setup(self, trainer, pl_module, stage: str) -> None:
        pl_module.loss.register_forward_hook(self._poison, prepend=True)

    def _poison(self, module, args, output):
        if self._now not in self.steps:
            return None
        total, parts = output if isinstance(output, tuple) else (output, None)
        total = total + torch.full_like(total, float("nan")).detach()
        return (total, parts) if parts is not None else total

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._now = int(trainer.global_step)

    def on_after_backward(self, trainer, pl_module) -> None:
        if self._now in self.steps:
            bad = [n for n, p in pl_module.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
            assert not bad, f"NaNLossAt: step {self._now}'s gradients are not finite ({bad[:3]})"


class StepSnapshot(Callback):
    """Saves the weights and the optimiser state just before and just after step ``step`` to ``path``
    (``{"before": ..., "after": ...}``, each ``{"weights": state_dict, "optimizer": optimizer state_dict}``)."""

    def __init__(self, step: int, path: str):
        self.step, self.path = int(step), Path(path)
        self._before = None

    def _state(self, trainer, pl_module) -> dict:
        import copy

        return {"weights": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict())}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self._before = self._state(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._before is not None and trainer.global_step == self.step + 1:
            torch.save({"before": self._before, "after": self._state(trainer, pl_module)}, self.path)
            self._before = None
