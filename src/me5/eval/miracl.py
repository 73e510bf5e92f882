"""MIRACL as published -> the per-language BEIR layout that :func:`me5.eval.retrieval.load_beir` reads.

Input (the two Hugging Face downloads, unchanged):

* ``raw_corpus_dir`` = ``miracl/miracl-corpus``: ``miracl-corpus-v1.0-<lang>/docs-*.jsonl.gz`` (plain ``.jsonl``
  is read too), one passage a line: ``{"docid": "123#0", "title": ..., "text": ...}``.
* ``raw_topics_dir`` = ``miracl/miracl``: ``miracl-v1.0-<lang>/topics/topics.miracl-v1.0-<lang>-<split>.tsv``
  (``qid<TAB>query``, no header) and ``miracl-v1.0-<lang>/qrels/qrels.miracl-v1.0-<lang>-<split>.tsv``
  (TREC: ``qid Q0 docid rel``, tab- or space-separated).

Output, one folder per language (the MIRACL style of :func:`~me5.eval.retrieval.load_beir`):

* ``<out>/<lang>/corpus.jsonl.gz``: ``{"_id", "title", "text"}``, in the input's order (gzip, never held in memory);
* ``<out>/<lang>/queries.jsonl``: ``{"_id", "text"}``, the topics that keep at least one judgment;
* ``<out>/<lang>/qrels/<split>.tsv``: ``query-id<TAB>corpus-id<TAB>score`` with that header;
* ``<out>/<lang>/.me5-miracl.json``: the done-marker (split, inputs, counts), written last;
* ``<out>/stats.json``: the counts of every language of the call (also :func:`convert_miracl`'s return value).

Files are written under temporary names (``*.part``, ``corpus.partial.jsonl.gz``) and renamed when the language
is complete, so an interrupted language leaves no ``corpus.jsonl.gz`` behind for the loader to pick up, and is converted again from the start on the next call;
a language with a done-marker (same split, same input files) is skipped. One output folder holds one split.

What is dropped is counted by reason (``dropped`` in the stats) and logged: judgments of a docid that is not
in the corpus (the first few docids are listed), judgments of a qid that is not a topic, topics without any
judgment, topics whose judgments all name missing documents, and later copies of a duplicated docid. A
repeated (qid, docid) judgment keeps the last grade. Missing inputs and malformed lines raise
:class:`~me5.errors.DataError` naming the file (and line); every language's inputs are checked before any is
converted.

Memory: the topics and qrels of one language, and 8 bytes per passage (a hash of each docid, to find duplicated
docids without holding the ids; about 260 MB for the 32.9M English passages).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import time
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from me5.data.readers import iter_jsonl
from me5.errors import ConfigError, DataError
from me5.jsonio import write_json

log = logging.getLogger(__name__)

# the 16 "known" languages of the MIRACL dev split in mE5 Tables 4 and 6 (de and yo, the surprise languages, excluded)
LANGUAGES = ("ar", "bn", "en", "es", "fa", "fi", "fr", "hi", "id", "ja", "ko", "ru", "sw", "te", "th", "zh")

STATS_FORMAT = "me5-miracl/1"
MARKER = ".me5-miracl.json"
STATS_FILE = "stats.json"
MISSING_SAMPLE = 10  # docids not in the corpus listed per language
_BUFFER_LINES = 4096
_DROP_REASONS = (
    "qrels_docid_not_in_corpus",
    "qrels_unknown_query",
    "queries_without_judgments",
    "queries_all_judgments_dropped",
    "duplicate_docid",
)


# ---------------------------------------------------------------------------------------------- input paths
def corpus_dir(raw_corpus_dir: str | os.PathLike, lang: str) -> Path:
    return Path(raw_corpus_dir) / f"miracl-corpus-v1.0-{lang}"


def topics_file(raw_topics_dir: str | os.PathLike, lang: str, split: str = "dev") -> Path:
    return Path(raw_topics_dir) / f"miracl-v1.0-{lang}" / "topics" / f"topics.miracl-v1.0-{lang}-{split}.tsv"


def qrels_file(raw_topics_dir: str | os.PathLike, lang: str, split: str = "dev") -> Path:
    return Path(raw_topics_dir) / f"miracl-v1.0-{lang}" / "qrels" / f"qrels.miracl-v1.0-{lang}-{split}.tsv"


def corpus_files(raw_corpus_dir: str | os.PathLike, lang: str) -> list[Path]:
    """``docs-*.jsonl.gz`` / ``docs-*.jsonl`` of a language in numeric order (``docs-2`` before ``docs-10``)."""
    folder = corpus_dir(raw_corpus_dir, lang)
    if not folder.is_dir():
        raise DataError("no such MIRACL corpus folder", file=str(folder))
    files = [f for f in folder.iterdir() if f.is_file() and re.fullmatch(r"docs-.*\.jsonl(\.gz)?", f.name)]
    if not files:
        raise DataError("MIRACL corpus folder has no docs-*.jsonl.gz files", file=str(folder))

    def key(f: Path):
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", f.name)]

    return sorted(files, key=key)


# ---------------------------------------------------------------------------------------------- TSV readers
def _tsv_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line_number, line)`` of the non-blank lines; a missing file or non-UTF-8 line is a DataError."""
    if not path.is_file():
        raise DataError("no such file", file=str(path))
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                raise DataError(f"not valid UTF-8 ({err.reason})", file=str(path), line=line_no) from None
            if line.strip():
                yield line_no, line


def read_topics(path: str | os.PathLike) -> dict[str, str]:
    """{qid: query} in file order from ``qid<TAB>query`` lines (a ``qid<TAB>query`` header line is skipped)."""
    path = Path(path)
    topics: dict[str, str] = {}
    for line_no, line in _tsv_lines(path):
        cols = line.split("\t", 1)
        if len(cols) != 2:
            raise DataError("expected 2 tab-separated columns (qid, query), got 1", file=str(path), line=line_no)
        qid, query = cols[0].strip(), cols[1].strip()
        if line_no == 1 and qid.lower() in {"qid", "query-id", "query_id"}:
            continue
        if not qid:
            raise DataError("empty qid", file=str(path), line=line_no)
        if not query:
            raise DataError(f"empty query text for qid '{qid}'", file=str(path), line=line_no)
        if qid in topics:
            raise DataError(f"duplicate qid '{qid}'", file=str(path), line=line_no)
        topics[qid] = query
    return topics


def read_trec_qrels(path: str | os.PathLike, counts: Counter | None = None) -> dict[str, dict[str, int]]:
    """{qid: {docid: grade}} in file order from TREC ``qid Q0 docid rel`` lines (tabs or spaces).

    A repeated (qid, docid) keeps the last grade and counts ``duplicate_judgment`` in ``counts``.
    """
    path = Path(path)
    qrels: dict[str, dict[str, int]] = {}
    for line_no, line in _tsv_lines(path):
        cols = line.split()
        if len(cols) != 4:
            raise DataError(
                f"expected 4 columns (qid Q0 docid rel), got {len(cols)}", file=str(path), line=line_no
            )
        qid, _, docid, rel = cols
        try:
            grade = int(rel)
        except ValueError:
            raise DataError(f"relevance '{rel}' is not an integer", file=str(path), line=line_no) from None
        rels = qrels.setdefault(qid, {})
        if docid in rels and counts is not None:
            counts["duplicate_judgment"] += 1
        rels[docid] = grade
    return qrels


# ---------------------------------------------------------------------------------------------- writing
def _open_gzip_out(path: Path):
    """A gzip file for writing with a fixed header time (the same input gives the same bytes)."""
    raw = open(path, "wb")
    return gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0), raw


_ENCODER = json.JSONEncoder(ensure_ascii=False)


def _doc_line(docid: str, title: str, text: str) -> bytes:
    return (_ENCODER.encode({"_id": docid, "title": title, "text": text}) + "\n").encode("utf-8")


# ---------------------------------------------------------------------------------------------- one language
class _Language:
    def __init__(self, lang: str, raw_corpus_dir, raw_topics_dir, out_dir: Path, split: str):
        self.lang, self.split = lang, split
        self.raw_corpus_dir = Path(raw_corpus_dir)
        self.topics_path = topics_file(raw_topics_dir, lang, split)
        self.qrels_path = qrels_file(raw_topics_dir, lang, split)
        self.corpus_dir = corpus_dir(raw_corpus_dir, lang)
        self.out = out_dir / lang
        self.marker = self.out / MARKER

    def check(self) -> None:
        """The inputs exist and the output folder holds no other split (before any language is converted)."""
        for path in (self.topics_path, self.qrels_path):
            if not path.is_file():
                raise DataError(f"no such MIRACL {self.split} file", file=str(path))
        self.files = corpus_files(self.raw_corpus_dir, self.lang)
        done = self._marker()
        if done is not None and done.get("split") != self.split:
            raise DataError(
                f"this folder holds the MIRACL '{done.get('split')}' split; convert '{self.split}' into another "
                "output folder",
                file=str(self.marker),
            )

    def inputs(self) -> dict:
        return {
            "topics": str(self.topics_path.resolve()),
            "qrels": str(self.qrels_path.resolve()),
            "corpus": [f.name for f in self.files],
            "bytes": sum(f.stat().st_size for f in [self.topics_path, self.qrels_path, *self.files]),
        }

    def _marker(self) -> dict | None:
        if not self.marker.is_file():
            return None
        try:
            return json.loads(self.marker.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None  # unreadable: convert again

    def done_stats(self) -> dict | None:
        done = self._marker()
        if done is None or done.get("format") != STATS_FORMAT or done.get("split") != self.split:
            return None
        if done.get("inputs") != self.inputs():
            log.info("miracl %s: the input files changed since the last conversion; converting again", self.lang)
            return None
        return done["stats"]

    # -------------------------------------------------------------- convert
    def convert(self, progress: bool) -> dict:
        start = time.monotonic()
        counts: Counter = Counter()
        topics = read_topics(self.topics_path)
        qrels = read_trec_qrels(self.qrels_path, counts)
        counts["topics"] = len(topics)
        counts["judgments"] = sum(len(r) for r in qrels.values())
        judged = {did for rels in qrels.values() for did in rels}

        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "qrels").mkdir(exist_ok=True)
        self.marker.unlink(missing_ok=True)
        corpus_part = self.out / "corpus.partial.jsonl.gz"  # read back as gzip by its suffix
        found = self._write_corpus(corpus_part, judged, counts, progress)

        missing: list[str] = []
        kept: dict[str, dict[str, int]] = {}
        for qid, rels in qrels.items():
            if qid not in topics:
                counts["dropped/qrels_unknown_query"] += len(rels)
                continue
            known = {}
            for did, grade in rels.items():
                if did in found:
                    known[did] = grade
                else:
                    counts["dropped/qrels_docid_not_in_corpus"] += 1
                    if len(missing) < MISSING_SAMPLE and did not in missing:
                        missing.append(did)
            if known:
                kept[qid] = known
            else:
                counts["dropped/queries_all_judgments_dropped"] += 1
        counts["dropped/queries_without_judgments"] = sum(1 for q in topics if q not in qrels)
        if not kept:
            raise DataError(
                f"no judgment names both a topic and a document of the corpus {self.corpus_dir}",
                file=str(self.qrels_path),
            )
        counts["queries_written"] = len(kept)
        counts["judgments_written"] = sum(len(r) for r in kept.values())
        counts["relevant_written"] = sum(1 for r in kept.values() for g in r.values() if g > 0)
        counts["queries_without_relevant"] = sum(1 for r in kept.values() if not any(g > 0 for g in r.values()))

        queries_part = self.out / "queries.jsonl.part"
        with queries_part.open("w", encoding="utf-8") as fh:
            for qid, query in topics.items():
                if qid in kept:
                    fh.write(json.dumps({"_id": qid, "text": query}, ensure_ascii=False) + "\n")
        qrels_part = self.out / "qrels" / f"{self.split}.tsv.part"
        with qrels_part.open("w", encoding="utf-8") as fh:
            fh.write("query-id\tcorpus-id\tscore\n")
            for qid, rels in kept.items():
                for did, grade in rels.items():
                    fh.write(f"{qid}\t{did}\t{grade}\n")

        os.replace(queries_part, self.out / "queries.jsonl")
        os.replace(qrels_part, self.out / "qrels" / f"{self.split}.tsv")
        (self.out / "corpus.jsonl").unlink(missing_ok=True)  # a plain corpus would be read in place of ours
        os.replace(corpus_part, self.out / "corpus.jsonl.gz")

        stats = _stats(counts, missing, time.monotonic() - start)
        self._log(stats)
        write_json(self.marker, {"format": STATS_FORMAT, "lang": self.lang, "split": self.split,
                                 "inputs": self.inputs(), "stats": stats})
        return stats

    def _write_corpus(self, path: Path, judged: set[str], counts: Counter, progress: bool) -> set[str]:
        """Stream the corpus files to ``path``; return the judged docids that were found."""
        from tqdm.auto import tqdm

        found: set[str] = set()
        hashes = array("q")  # hash(docid) of every passage: duplicated docids without holding the ids
        gz, raw = _open_gzip_out(path)
        bar = tqdm(desc=f"miracl {self.lang}", unit=" docs", unit_scale=True, disable=not progress, leave=True)
        try:
            buf: list[bytes] = []
            for f in self.files:
                bar.set_postfix_str(f.name, refresh=False)
                for line_no, rec in iter_jsonl(f):
                    docid, title, text = _passage(rec, f, line_no)
                    if not text.strip():
                        counts["docs_empty_text"] += 1
                    hashes.append(hash(docid))
                    if docid in judged:
                        found.add(docid)
                    buf.append(_doc_line(docid, title, text))
                    if len(buf) >= _BUFFER_LINES:
                        gz.write(b"".join(buf))
                        bar.update(len(buf))
                        buf.clear()
            gz.write(b"".join(buf))
            bar.update(len(buf))
        finally:
            bar.close()
            gz.close()
            raw.close()
        counts["corpus_files"] = len(self.files)
        counts["docs"] = len(hashes)
        dup = _repeated(hashes)
        del hashes
        if dup:
            self._drop_duplicates(path, dup, counts)
        return found

    def _drop_duplicates(self, path: Path, dup_hashes: set[int], counts: Counter) -> None:
        """Rewrite ``path`` keeping the first passage of every docid (only ids whose hash repeats are held)."""
        seen: set[str] = set()
        examples: list[str] = []
        tmp = path.with_name("corpus.dedup.jsonl.gz")
        gz, raw = _open_gzip_out(tmp)
        try:
            buf: list[bytes] = []
            for _, rec in iter_jsonl(path):
                docid = rec["_id"]
                if hash(docid) in dup_hashes:
                    if docid in seen:
                        counts["dropped/duplicate_docid"] += 1
                        if len(examples) < MISSING_SAMPLE:
                            examples.append(docid)
                        continue
                    seen.add(docid)
                buf.append(_doc_line(docid, rec["title"], rec["text"]))
                if len(buf) >= _BUFFER_LINES:
                    gz.write(b"".join(buf))
                    buf.clear()
            gz.write(b"".join(buf))
        finally:
            gz.close()
            raw.close()
        os.replace(tmp, path)
        counts["docs"] -= counts["dropped/duplicate_docid"]
        if examples:
            log.warning("miracl %s: dropped %d later copies of duplicated docids (e.g. %s)", self.lang,
                        counts["dropped/duplicate_docid"], ", ".join(examples))

    def _log(self, stats: dict) -> None:
        dropped = {k: v for k, v in stats["dropped"].items() if v}
        log.info(
            "miracl %s: %d passages, %d queries, %d judgments written (%.0f s)%s",
            self.lang, stats["docs"], stats["queries_written"], stats["judgments_written"], stats["seconds"],
            "; dropped: " + ", ".join(f"{k} {v}" for k, v in dropped.items()) if dropped else "",
        )  # fmt: skip
        if stats["dropped"]["qrels_docid_not_in_corpus"]:
            log.warning(
                "%s: %d judgments name a docid that is not in %s (e.g. %s); dropped",
                self.qrels_path, stats["dropped"]["qrels_docid_not_in_corpus"], self.corpus_dir,
                ", ".join(stats["missing_docids"]),
            )  # fmt: skip
        if stats["queries_without_relevant"]:
            log.warning("miracl %s: %d queries have no relevant document; they score 0",
                        self.lang, stats["queries_without_relevant"])


def _passage(rec: dict, path: Path, line_no: int) -> tuple[str, str, str]:
    docid = rec.get("docid")
    if isinstance(docid, int) and not isinstance(docid, bool):
        docid = str(docid)
    if not isinstance(docid, str) or not docid.strip():
        what = "missing" if docid is None else f"expected a non-empty string, got {docid!r}"
        raise DataError(what, file=str(path), line=line_no, field="docid")
    title = rec.get("title")
    title = "" if title is None else title
    text = rec.get("text")
    for name, value in (("title", title), ("text", text)):
        if not isinstance(value, str):
            what = "missing" if value is None else f"expected a string, got {type(value).__name__}"
            raise DataError(what, file=str(path), line=line_no, field=name)
    return docid, title, text


def _repeated(hashes: array) -> set[int]:
    """The values that occur more than once."""
    if len(hashes) < 2:
        return set()
    s = np.sort(np.frombuffer(hashes, dtype=np.int64))
    same = s[1:] == s[:-1]
    return set(np.unique(s[1:][same]).tolist()) if same.any() else set()


def _stats(counts: Counter, missing: list[str], seconds: float) -> dict:
    return {
        "corpus_files": counts["corpus_files"],
        "docs": counts["docs"],
        "docs_empty_text": counts["docs_empty_text"],
        "topics": counts["topics"],
        "judgments": counts["judgments"],
        "duplicate_judgment": counts["duplicate_judgment"],
        "queries_written": counts["queries_written"],
        "judgments_written": counts["judgments_written"],
        "relevant_written": counts["relevant_written"],
        "queries_without_relevant": counts["queries_without_relevant"],
        "dropped": {reason: counts[f"dropped/{reason}"] for reason in _DROP_REASONS},
        "missing_docids": missing,
        "seconds": round(seconds, 1),
    }


def _totals(per_lang: dict[str, dict]) -> dict:
    totals: Counter = Counter()
    dropped: Counter = Counter()
    for stats in per_lang.values():
        totals.update({k: v for k, v in stats.items() if isinstance(v, int | float) and not isinstance(v, bool)})
        dropped.update(stats["dropped"])
    out = dict(totals)
    if "seconds" in out:
        out["seconds"] = round(out["seconds"], 1)
    out["dropped"] = {reason: dropped[reason] for reason in _DROP_REASONS}
    return out


# ---------------------------------------------------------------------------------------------- entry point
def convert_miracl(
    raw_corpus_dir: str | os.PathLike,
    raw_topics_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    languages: Sequence[str] | None = None,
    split: str = "dev",
    progress: bool = True,
) -> dict:
    """Convert MIRACL (``miracl/miracl-corpus`` + ``miracl/miracl``) to ``out_dir/<lang>/`` BEIR folders.

    Args:
        raw_corpus_dir: the ``miracl/miracl-corpus`` download (``miracl-corpus-v1.0-<lang>/docs-*.jsonl.gz``).
        raw_topics_dir: the ``miracl/miracl`` download (``miracl-v1.0-<lang>/{topics,qrels}/*-<split>.tsv``).
        out_dir: the output folder (``eval=miracl`` reads it with ``load_beir(out_dir, split=split)``).
        languages: default :data:`LANGUAGES` (the 16 of mE5 Table 4).
        split: the MIRACL split (``dev`` for the paper's numbers).
        progress: a tqdm bar per language.

    Returns the stats also written to ``out_dir/stats.json``: ``{"format", "split", "out", "languages":
    {lang: {counts..., "dropped": {reason: n}, "missing_docids": [...], "resumed": bool}}, "totals": {...}}``.
    Raises :class:`~me5.errors.DataError` for a missing or malformed input (file and line) before any
    language is converted where it can (missing files), else when the bad line is reached.
    """
    langs = list(dict.fromkeys(LANGUAGES if languages is None else languages))
    if not langs:
        raise ConfigError("languages", "no MIRACL language to convert")
    if not split or "/" in split:
        raise ConfigError("split", f"not a MIRACL split name: {split!r}")
    out = Path(out_dir)
    jobs = [_Language(lang, raw_corpus_dir, raw_topics_dir, out, split) for lang in langs]
    for job in jobs:
        job.check()
    out.mkdir(parents=True, exist_ok=True)
    per_lang: dict[str, dict] = {}
    for job in jobs:
        stats = job.done_stats()
        if stats is not None:
            log.info("miracl %s: already converted (%s); skipped", job.lang, job.marker)
            per_lang[job.lang] = {**stats, "resumed": True}
            continue
        per_lang[job.lang] = {**job.convert(progress), "resumed": False}
    result = {
        "format": STATS_FORMAT,
        "split": split,
        "out": str(out),
        "languages": per_lang,
        "totals": _totals(per_lang),
    }
    write_json(out / STATS_FILE, result)
    return result
