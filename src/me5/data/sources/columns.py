"""A source whose records already hold the pair in named columns (most hub pair datasets)."""

from __future__ import annotations

from collections.abc import Mapping

from me5.data.source import Source
from me5.data.sources.raw import require_mapping
from me5.errors import DataError


class ColumnPairs(Source):
    """Reads the schema fields (``query``, ``positive``, ``negatives``, ``teacher_scores``, ``lang``, ``instruction``,
    ``symmetric``) from the columns named in ``columns``.

    Args:
        columns: schema field -> raw column, e.g. ``{query: title, positive: text}``. Unmapped schema fields are
            read under their own name when present.
        kwargs: the :class:`~me5.data.source.Source` arguments (``task``/``instruction``, ``symmetric``, ...).
    """

    def __init__(self, path: str | None = None, *, columns: Mapping[str, str] | None = None, **kwargs):
        super().__init__(path, **kwargs)
        self.columns = dict(columns or {})

    def convert(self, record: Mapping) -> Mapping:
        record = require_mapping(record)  # a jsonl line may be a JSON array
        out = {}
        for field in ("query", "positive", "negatives", "teacher_scores", "lang", "instruction", "symmetric"):
            column = self.columns.get(field, field)
            if column in record:
                out[field] = record[column]
            elif field in self.columns:
                raise DataError(f"raw column '{column}' is missing (columns: {sorted(record)})", field=field)
        return out
