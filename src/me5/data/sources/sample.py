"""The embedded multilingual sample data: generated on first use, no download (see ``me5.data.synthetic``)."""

from __future__ import annotations

from pathlib import Path

from me5.data.base import TextPairDataModule


class SamplePairs(TextPairDataModule):
    """Pairs from the generated sample set: ``pretrain.jsonl`` (weak pairs) or ``finetune.jsonl`` (with hard
    negatives and synthetic teacher scores). ``prepare_data`` generates the files (idempotent, seeded)."""

    source_name = "sample"
    default_lang = "und"

    def __init__(self, root: str, *, file: str = "pretrain.jsonl", data_seed: int = 0, **kwargs):
        self.root = Path(root)
        self.data_seed = data_seed
        super().__init__(path=str(self.root / file), **kwargs)

    def prepare_data(self) -> None:
        from me5.data.synthetic import generate_sample_data

        generate_sample_data(self.root, seed=self.data_seed)
