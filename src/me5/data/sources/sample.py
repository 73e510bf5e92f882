"""The embedded multilingual sample data: generated on first use, no download (see ``me5.data.synthetic``)."""

from __future__ import annotations

from pathlib import Path

from me5.data.source import Source
from me5.data.synthetic import OUTPUT_FILES, check_sample_folder
from me5.errors import DataError


class SamplePairs(Source):
    """Pairs from the generated sample set: ``pretrain.jsonl`` (weak pairs) or ``finetune.jsonl`` (with hard
    negatives and synthetic teacher scores). ``prepare_data`` generates the files (idempotent, seeded) into
    ``root``, which must be empty, absent or a folder me5 generated: it never writes into a folder of your data
    (train on your own files with ``data=files``)."""

    source_name = "sample"
    default_lang = "und"

    def __init__(self, root: str, *, file: str = "pretrain.jsonl", data_seed: int = 0, **kwargs):
        self.root = Path(root)
        self.file = file
        self.data_seed = data_seed
        super().__init__(path=str(self.root / file), **kwargs)

    def generates(self) -> list[str]:
        return [str(self.root)]

    def check(self) -> None:
        """The file is one the generator writes (or is already there), and ``root`` is safe to generate into."""
        if self.file not in OUTPUT_FILES and not (self.root / self.file).is_file():
            raise DataError(f"not a sample data file; the generator writes {list(OUTPUT_FILES)}",
                            file=str(self.root / self.file))
        check_sample_folder(self.root)

    def prepare_data(self) -> None:
        from me5.data.synthetic import generate_sample_data

        generate_sample_data(self.root, seed=self.data_seed)
