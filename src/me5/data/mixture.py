"""The realised mixture of the training data: pairs per source and language, as table rows and log scalars.

:class:`~me5.data.datamodule.PairDataModule` counts what the training loop consumed
(``realised_mixture``); the app's ``RealisedMixtureLogger`` callback logs these rows and scalars.
"""

from __future__ import annotations

from collections.abc import Mapping


def mixture_table(counts: Mapping[str, Mapping[str, int]]) -> list[tuple[str, str, int, float]]:
    """Rows ``(source, lang, pairs, share of all pairs)`` of a realised mixture, sorted."""
    total = sum(n for langs in counts.values() for n in langs.values()) or 1
    return [(s, lang, int(n), n / total) for s, langs in sorted(counts.items()) for lang, n in sorted(langs.items())]


def mixture_scalars(counts: Mapping[str, Mapping[str, int]], *, prefix: str = "data/mix") -> dict[str, float]:
    """``{prefix/<source>: share of pairs}`` and ``{prefix/lang/<lang>: share}`` of a realised mixture."""
    total = sum(n for langs in counts.values() for n in langs.values()) or 1
    out = {f"{prefix}/{s}": sum(langs.values()) / total for s, langs in sorted(counts.items())}
    by_lang: dict[str, int] = {}
    for langs in counts.values():
        for lang, n in langs.items():
            by_lang[lang] = by_lang.get(lang, 0) + n
    out.update({f"{prefix}/lang/{lang}": n / total for lang, n in sorted(by_lang.items())})
    return out
