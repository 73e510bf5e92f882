"""Reddit: (comment, response) pairs, mE5 Table 1 (160M sampled)."""

from __future__ import annotations

from collections.abc import Mapping

from me5.data.sources.raw import RawPairSource, get_field, nonempty
from me5.errors import SkipRecord

DELETED_BODIES = frozenset({"[deleted]", "[removed]"})


class RedditPairs(RawPairSource):
    """Reddit (comment, response): a comment and a direct reply to it.

    Raw origin: Pushshift Reddit comment dumps (E5/mE5 cite no hub copy). The dumps hold single comments
    (Pushshift comment fields used here: ``body``, ``score``; ``id``/``parent_id`` for the join - the dump's
    well-known schema, not re-verified from the stored sources), so a pair
    needs a join of each reply to its parent comment (``reply.parent_id == "t1_" + comment.id``), which is a
    preprocessing step outside this class. A raw record here is one joined pair::

        {"comment": {<Pushshift comment>}, "response": {<Pushshift reply>}}

    Each side may also be a plain string (e.g. a flat ``comment``/``response`` export without scores); the
    field names are ``comment_field``/``response_field``. There is no default path: no public hub copy with
    the scores the E5 filter needs could be verified (``sentence-transformers/reddit`` was not checkable).

    Field mapping: (``comment.body``, ``response.body``).
    Language: English (``en``) unless the record or ``lang`` says otherwise.
    Prefixes: ``query: `` / ``passage: ``; instruction: :attr:`instruction`.
    Filters (E5 CCPairs heuristics, applied to both comments): longer than ``max_comment_chars`` (4096) ->
    ``skipped/comment_too_long``; ``score`` below ``min_score`` (1) -> ``skipped/low_score`` (only where a
    score is present); ``[deleted]``/``[removed]`` bodies -> ``skipped/deleted``.
    """

    source_name = "reddit"
    default_path = None
    default_lang = "en"
    one_language_per_file = True
    task = "reddit"
    comment_field = "comment"
    response_field = "response"
    max_comment_chars = 4096
    min_score = 1

    def pair(self, record: Mapping) -> Mapping:
        return {"query": self._side(record, self.comment_field), "positive": self._side(record, self.response_field)}

    def _side(self, record: Mapping, key: str) -> str:
        side = get_field(record, key, kind=(str, Mapping))
        if isinstance(side, str):
            body = side
        else:
            body = get_field(side, "body", label=f"{key}.body")
            score = side.get("score")
            if score is not None:
                score = get_field(side, "score", kind=(int, float), label=f"{key}.score")
                if score < self.min_score:
                    raise SkipRecord("low_score")
        body = nonempty(body, key)
        if body in DELETED_BODIES:
            raise SkipRecord("deleted")
        if len(body) > self.max_comment_chars:
            raise SkipRecord("comment_too_long")
        return body
