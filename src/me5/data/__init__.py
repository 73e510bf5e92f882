"""Text-pair data: the normalised schema, readers, the base DataModule, mixtures and sources."""

from me5.data.base import MixtureDataModule, PairBatchStream, TextPairDataModule
from me5.data.collate import PairCollator, TrainItem
from me5.data.schema import PairExample, to_example

__all__ = ["MixtureDataModule", "PairBatchStream", "PairCollator", "PairExample", "TextPairDataModule", "TrainItem", "to_example"]
