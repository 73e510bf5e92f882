"""A console people can read: each library line once, without advertisements or known-harmless noise.

Filtered at the source -- the named logger or warning module and the exact message -- not by hiding warnings or
log levels wholesale: anything else a library says still reaches the console and ``train.log``.
"""

from __future__ import annotations

import logging
import re
import warnings

# (logger, substring) of messages that carry no information for a me5 run
_DROPPED = (
    ("lightning.pytorch.utilities.rank_zero", "litlogger"),  # an advertisement for another product
    # every stage ends at its max_steps, which the bar's last line shows (other reasons to stop are still printed)
    ("lightning.pytorch.utilities.rank_zero", "`Trainer.fit` stopped: `max_steps="),
    # me5 says it first ("resuming stage <stage> from <path>"); Lightning's "Restored all states" line stays
    ("lightning.pytorch.utilities.rank_zero", "Restoring states from the checkpoint path at "),
)
# (logger, regex) of messages that each Trainer repeats word for word: shown the first time only
_ONCE = (
    ("lightning.pytorch.utilities.rank_zero", r"^[GTH]PU available: "),  # the hardware, again for every stage
)
# (category, message regex, module regex) of warnings raised inside libraries that me5 cannot act on
_WARNINGS = (
    # torch's pytree deprecation, raised by Lightning's own pytree helper
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\.pytorch\.utilities\._pytree"),
    # stages without val_every: the module has a validation_step and no validation data, on purpose
    (UserWarning, r"You defined a `validation_step` but have no `val_dataloader`",
     r"lightning\.pytorch\.trainer\.configuration_validator"),
    # a 13-line note about a Lightning test model's `saved_models`/`layer`: me5's manual (GradCache) step
    # checkpoints the state after the optimiser step of global_step, which is what a resume needs
    (UserWarning, r"Using ModelCheckpoint with manual optimization and every_n_train_steps",
     r"lightning\.pytorch\.callbacks\.model_checkpoint"),
    # a run's checkpoint folder holds checkpoints only when the run resumes (me5 logs "resuming stage ... from")
    (UserWarning, r"Checkpoint directory .* exists and is not empty\.", r"lightning\.pytorch\.callbacks\.model_checkpoint"),
)


class _Drop(logging.Filter):
    def __init__(self, needle: str):
        super().__init__()
        self.needle = needle

    def filter(self, record: logging.LogRecord) -> bool:
        return self.needle not in record.getMessage()


class _Once(logging.Filter):
    """Passes a message matching ``pattern`` the first time its exact text is seen, drops it afterwards."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern, self._re, self.seen = pattern, re.compile(pattern), set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if not self._re.search(msg):
            return True
        if msg in self.seen:
            return False
        self.seen.add(msg)
        return True


def tidy_console() -> None:
    """Lightning's loggers print through the root handler only (Hydra's: console + ``train.log``), not a second
    time through their own; drop the messages in ``_DROPPED``, repeats of those in ``_ONCE``, and the warnings in
    ``_WARNINGS``. Called once per run; calling it again adds nothing twice."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        if logging.getLogger().handlers:  # Hydra configured the root: let the records propagate there once
            for h in list(lg.handlers):
                lg.removeHandler(h)
            lg.propagate = True
    for name, needle in _DROPPED:
        lg = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.needle == needle for f in lg.filters):
            lg.addFilter(_Drop(needle))
    for name, pattern in _ONCE:  # once per run: a sweep's next job (same process) shows them again
        lg = logging.getLogger(name)
        for f in [f for f in lg.filters if isinstance(f, _Once) and f.pattern == pattern]:
            lg.removeFilter(f)
        lg.addFilter(_Once(pattern))
    for category, message, module in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
