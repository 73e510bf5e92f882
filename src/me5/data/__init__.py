"""Text-pair data, in rooms (see docs/ARCHITECTURE.md):

* ``schema`` (the normalised record), ``readers`` (files, hub streams, units), ``records`` (the one record
  classifier: kept or skipped by reason);
* ``source`` (:class:`Source`: where a source lives, how a raw record becomes an example, its language and
  prompt role) and ``sources/`` (one small class per paper source);
* ``collate`` (prompts and negatives per item, tokenisation), ``stream`` (in-memory and sharded batch streams),
  ``position`` (the checkpointed data position), ``datamodule`` (:class:`PairDataModule`, the one
  LightningDataModule), ``mixture`` (the realised mixture as rows and scalars);
* ``shards`` (raw sources -> sharded parquet + statistics), ``decontaminate`` (eval-set overlap, language
  checks), ``synthetic`` (the generated sample data).
"""

from me5.data.collate import ItemFormatter, PairCollator, TrainItem
from me5.data.datamodule import PairDataModule
from me5.data.records import RecordClassifier
from me5.data.schema import PairExample, to_example
from me5.data.source import Source
from me5.data.stream import PairBatchStream, ShardedPairStream

__all__ = ["ItemFormatter", "PairBatchStream", "PairCollator", "PairDataModule", "PairExample", "RecordClassifier",
           "ShardedPairStream", "Source", "TrainItem", "to_example"]
