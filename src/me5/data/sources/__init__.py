"""One small :class:`~me5.data.source.Source` per data source.

``STAGE1_SOURCES`` maps the mE5 Table 1 (stage-1 pre-training) source names to their classes; each class's
docstring names its pair, raw origin, field mapping, language and prefix policy, and filters.
"""

from __future__ import annotations

from me5.data.sources.ccnews import CCNewsPairs
from me5.data.sources.mc4 import MC4Pairs
from me5.data.sources.nllb import NLLBPairs
from me5.data.sources.reddit import RedditPairs
from me5.data.sources.s2orc import S2ORCPairs
from me5.data.sources.sbert import SbertPairs
from me5.data.sources.stackexchange import StackExchangePairs
from me5.data.sources.stage2 import STAGE2_SOURCES
from me5.data.sources.wikipedia import WikipediaPairs
from me5.data.sources.xp3 import XP3Pairs

STAGE1_SOURCES = {
    cls.source_name: cls
    for cls in (
        WikipediaPairs,
        MC4Pairs,
        CCNewsPairs,
        NLLBPairs,
        RedditPairs,
        S2ORCPairs,
        StackExchangePairs,
        XP3Pairs,
        SbertPairs,
    )
}

__all__ = [
    "STAGE1_SOURCES",
    "STAGE2_SOURCES",
    "CCNewsPairs",
    "MC4Pairs",
    "NLLBPairs",
    "RedditPairs",
    "S2ORCPairs",
    "SbertPairs",
    "StackExchangePairs",
    "WikipediaPairs",
    "XP3Pairs",
]
