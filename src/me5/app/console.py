"""A console people can read: each library line once, without advertisements or known-harmless noise.

Filtered at the source -- the named logger and the exact message -- not by hiding warnings or log levels
wholesale: anything else a library says still reaches the console and ``train.log``.
"""

from __future__ import annotations

import logging
import warnings

# (logger, substring) pairs of messages that carry no information for a me5 run
_DROPPED = (
    ("lightning.pytorch.utilities.rank_zero", "litlogger"),  # an advertisement for another product
)
# (category, message regex) of warnings raised inside libraries that me5 cannot act on
_WARNINGS = (
    (FutureWarning, r".*isinstance\(treespec, LeafSpec\).*"),  # torch's pytree deprecation, raised by Lightning
    (UserWarning, r"You defined a `validation_step` but have no `val_dataloader`.*"),  # stages without val_every
)


class _Drop(logging.Filter):
    def __init__(self, needle: str):
        super().__init__()
        self.needle = needle

    def filter(self, record: logging.LogRecord) -> bool:
        return self.needle not in record.getMessage()


def tidy_console() -> None:
    """Lightning's loggers print through the root handler only (Hydra's: console + ``train.log``), not a second
    time through their own; drop the messages in ``_DROPPED`` and the warnings in ``_WARNINGS``."""
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
    for category, message in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
