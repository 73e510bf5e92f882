"""Generated multilingual sample data: stage-1 weak pairs, stage-2 labelled pairs and a held-out BEIR eval.

The default ``make train`` needs data that exists without a download, runs on a laptop CPU, and still
measures something real: an untrained encoder must score low and a tiny trained one clearly higher, and
across languages. This module renders sentences from a hand-written lexicon (``assets/lexicon.tsv``:
~190 concepts in en, es, de, fr, ru, zh, ja, ar, hi) with one template per language.

Every passage states one *fact*: a subject wants to do something (verb) with an object at a place, plus
details that do not change its meaning (a number, an adjective, the day, a concept-free filler sentence).
A fact's *key* is its ``(subject, object, place)`` triple. The key space (~72k triples) is split by a
seeded hash (:func:`is_eval_key`): about 10% of the keys belong to the eval split and never occur in
``pretrain.jsonl`` or ``finetune.jsonl`` (not in queries, positives or hard negatives). So the eval
measures generalisation to unseen combinations, in every language; the words themselves are shared, as
real vocabulary is.

Files written to ``out_dir``:

* ``pretrain.jsonl`` stage 1 (weak pairs): ``query``, ``positive``, ``lang`` (the query's language),
  ``source``: ``sample/title-body`` (keyword title -> passage), ``sample/translation`` (the same passage in
  two languages), ``sample/question`` (question -> passage). About half of the pairs are cross-lingual.
* ``finetune.jsonl`` stage 2: ``query`` (a question), ``positive``, ``negatives`` (hard: passages whose key
  shares two of the query's three key concepts), ``teacher_scores`` (positive first) and ``lang``/``source``.
  The teacher scores are SYNTHETIC: they stand in for a cross-encoder's logits and are computed from the
  concept overlap between query and candidate (``10 * overlap - 2`` plus Gaussian noise, sd 1), not by a model.
* ``eval/corpus.jsonl`` (``_id``, ``title``, ``text``, ``lang``), ``eval/queries.jsonl`` (``_id``, ``text``,
  ``lang``), ``eval/qrels/test.tsv`` (``query-id corpus-id score``): the BEIR/MIRACL layout. Each query's
  relevant passages are in its own language, in another one, or both (a third of the queries each), so
  about a third of the queries are purely cross-lingual. Distractor passages share two of the three key
  concepts with a query.
* ``manifest.json``: the generator version, seed, sizes and the stats; a later call with the same
  arguments returns these stats and writes nothing (unless ``force``).

Determinism: everything derives from ``seed`` through string-seeded ``random.Random`` instances and
``hashlib`` (never Python's salted ``hash``), so the same seed writes byte-identical files anywhere. The
eval split depends only on the seed and ``n_eval_queries_per_lang``, not on the training sizes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from me5.errors import ConfigError, DataError
from me5.jsonio import write_atomic, write_text

GENERATOR_VERSION = 1
LEXICON_PATH = Path(__file__).with_name("assets") / "lexicon.tsv"
LANGS: tuple[str, ...] = ("en", "es", "de", "fr", "ru", "zh", "ja", "ar", "hi")
KEY_ROLES = ("subj", "obj", "place")
EVAL_PERMILLE = 100  # share of the key space held out for eval, in 1/1000
N_DISTRACTORS = 4  # per eval query: corpus passages sharing 2 of its 3 key concepts
N_BACKGROUND = 300  # extra eval-split passages unrelated to any query
MAX_EVAL_QUERIES_PER_LANG = 300

# One template per language. {Subj} is the subject with its first letter upper-cased.
PASSAGE_TEMPLATES = {
    "en": "The {subj} wants to {verb} {num} {adj} {obj} in {place}.",
    "es": "{Subj} quiere {verb} {num} {obj} {adj} en {place}.",
    "de": "{Subj} will in {place} {num} {adj} {obj} {verb}.",
    "fr": "{Subj} veut {verb} {num} {obj} {adj} à {place}.",
    "ru": "{Subj} хочет {verb} {num} {adj} {obj} в {place}.",
    "zh": "{subj}想在{place}{verb}{num}个{adj}的{obj}。",
    "ja": "{subj}は{place}で{adj}{obj}を{num}{verb}つもりだ。",
    "ar": "يريد {subj} أن {verb} {num} {obj} {adj} في {place}.",
    "hi": "{subj} {place} में {num} {adj} {obj} {verb} चाहता है।",
}
QUESTION_TEMPLATES = {
    "en": "Does the {subj} want to {verb} {obj} in {place}?",
    "es": "¿Quiere {subj} {verb} {obj} en {place}?",
    "de": "Will {subj} in {place} {obj} {verb}?",
    "fr": "Est-ce que {subj} veut {verb} {obj} à {place} ?",
    "ru": "Правда ли, что {subj} хочет {verb} {obj} в {place}?",
    "zh": "{subj}想在{place}{verb}{obj}吗？",
    "ja": "{subj}は{place}で{obj}を{verb}つもりですか？",
    "ar": "هل يريد {subj} أن {verb} {obj} في {place}؟",
    "hi": "क्या {subj} {place} में {obj} {verb} चाहता है?",
}
DAY_TEMPLATES = {
    "en": "Today is {time}.",
    "es": "Hoy es {time}.",
    "de": "Heute ist {time}.",
    "fr": "Aujourd'hui, c'est {time}.",
    "ru": "Сегодня {time}.",
    "zh": "今天是{time}。",
    "ja": "今日は{time}です。",
    "ar": "اليوم هو {time}.",
    "hi": "आज {time} है।",
}
# Concept-free filler sentences (the same four ideas in every language).
FILLERS = {
    "en": (
        "Everyone already knows about it.",
        "The plan is simple.",
        "Nobody is surprised.",
        "It will take some time.",
    ),
    "es": (
        "Todos ya lo saben.",
        "El plan es sencillo.",
        "Nadie está sorprendido.",
        "Llevará algo de tiempo.",
    ),
    "de": (
        "Alle wissen es schon.",
        "Der Plan ist einfach.",
        "Niemand ist überrascht.",
        "Es wird etwas Zeit dauern.",
    ),
    "fr": (
        "Tout le monde le sait déjà.",
        "Le plan est simple.",
        "Personne n'est surpris.",
        "Cela prendra du temps.",
    ),
    "ru": ("Все уже знают об этом.", "План простой.", "Никто не удивлён.", "Это займёт некоторое время."),
    "zh": ("大家都已经知道了。", "计划很简单。", "没有人感到惊讶。", "这需要一些时间。"),
    "ja": ("みんなもう知っている。", "計画は簡単だ。", "誰も驚いていない。", "少し時間がかかる。"),
    "ar": ("الجميع يعرف ذلك بالفعل.", "الخطة بسيطة.", "لا أحد متفاجئ.", "سيستغرق ذلك بعض الوقت."),
    "hi": ("सबको यह पहले से पता है।", "योजना सरल है।", "किसी को आश्चर्य नहीं है।", "इसमें कुछ समय लगेगा।"),
}
NO_SPACE_LANGS = {"zh", "ja"}  # sentences are joined without a space


# ----------------------------------------------------------------------------- lexicon
@dataclass(frozen=True)
class Lexicon:
    """Concept id -> {lang: word}, and role -> concept ids (in file order)."""

    words: dict[str, dict[str, str]]
    roles: dict[str, tuple[str, ...]]

    def word(self, concept: str, lang: str) -> str:
        return self.words[concept][lang]


@lru_cache(maxsize=4)
def load_lexicon(path: str | os.PathLike = LEXICON_PATH) -> Lexicon:
    """Read the tab-separated lexicon (header ``id role en es ...``; ``#`` lines are comments)."""
    words: dict[str, dict[str, str]] = {}
    roles: dict[str, list[str]] = {}
    with open(path, encoding="utf-8", newline="") as fh:
        rows = [
            r
            for r in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
            if r and not r[0].startswith("#")
        ]
    header, body = rows[0], rows[1:]
    missing = [lang for lang in LANGS if lang not in header]
    if header[:2] != ["id", "role"] or missing:
        raise DataError(f"bad lexicon header {header} (missing languages {missing})", file=str(path), line=1)
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise DataError(
                f"expected {len(header)} tab-separated columns, got {len(row)}", file=str(path), line=line
            )
        rec = dict(zip(header, row, strict=True))
        if rec["id"] in words:
            raise DataError(f"duplicate concept id '{rec['id']}'", file=str(path), line=line, field="id")
        for lang in LANGS:
            if not rec[lang].strip():
                raise DataError("empty translation", file=str(path), line=line, field=lang)
        words[rec["id"]] = {lang: rec[lang].strip() for lang in LANGS}
        roles.setdefault(rec["role"], []).append(rec["id"])
    return Lexicon(words, {k: tuple(v) for k, v in roles.items()})


# ----------------------------------------------------------------------------- facts and the split
@dataclass(frozen=True)
class Fact:
    """What a passage says. ``key`` (subject, object, place) defines the split; the rest is detail."""

    subj: str
    verb: str
    obj: str
    place: str
    adj: str
    num: str
    time: str

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.subj, self.obj, self.place)


@dataclass(frozen=True)
class Style:
    """How a passage is dressed (shared by the two sides of a translation pair)."""

    day: bool
    filler: int | None  # index into FILLERS[lang]
    main_first: bool


def is_eval_key(key: tuple[str, str, str], seed: int = 0) -> bool:
    """Whether the (subject, object, place) triple belongs to the held-out eval split for ``seed``."""
    digest = hashlib.blake2b(f"me5-synthetic/{seed}/{'|'.join(key)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 1000 < EVAL_PERMILLE


def _cap(word: str) -> str:
    return word[:1].upper() + word[1:]


def render_passage(fact: Fact, lang: str, style: Style, lex: Lexicon | None = None) -> str:
    lex = lex or load_lexicon()
    w = {
        role: lex.word(getattr(fact, role), lang)
        for role in ("subj", "verb", "obj", "place", "adj", "num", "time")
    }
    main = PASSAGE_TEMPLATES[lang].format(Subj=_cap(w["subj"]), **w)
    extra = []
    if style.day:
        extra.append(DAY_TEMPLATES[lang].format(time=w["time"]))
    if style.filler is not None:
        extra.append(FILLERS[lang][style.filler])
    parts = [main, *extra] if style.main_first else [*extra, main]
    return ("" if lang in NO_SPACE_LANGS else " ").join(parts)


def render_question(fact: Fact, lang: str, lex: Lexicon | None = None) -> str:
    lex = lex or load_lexicon()
    w = {role: lex.word(getattr(fact, role), lang) for role in ("subj", "verb", "obj", "place")}
    return QUESTION_TEMPLATES[lang].format(Subj=_cap(w["subj"]), **w)


def render_title(concepts: Iterable[str], lang: str, lex: Lexicon | None = None) -> str:
    lex = lex or load_lexicon()
    return " ".join(lex.word(c, lang) for c in concepts)


@lru_cache(maxsize=1)
def _parsers() -> list[re.Pattern]:
    """One regex per (language, passage/question template) with named groups for the key concepts."""
    lex = load_lexicon()
    out = []
    for lang in LANGS:
        by_word = {}
        for role in ("subj", "verb", "obj", "place", "adj", "num"):
            forms = sorted(
                {lex.word(c, lang) for c in lex.roles[role]}
                | ({_cap(lex.word(c, lang)) for c in lex.roles[role]} if role == "subj" else set()),
                key=len,
                reverse=True,
            )
            by_word[role] = "|".join(re.escape(f) for f in forms)
        for template in (PASSAGE_TEMPLATES[lang], QUESTION_TEMPLATES[lang]):
            pattern, pos = "", 0
            for m in re.finditer(r"\{(\w+)\}", template):
                pattern += re.escape(template[pos : m.start()])
                name = m.group(1)
                role = name.lower()
                group = f"(?P<{role}>{by_word[role]})" if role in KEY_ROLES else f"(?:{by_word[role]})"
                pattern += group
                pos = m.end()
            pattern += re.escape(template[pos:])
            out.append((lang, re.compile(pattern)))
    return out


@lru_cache(maxsize=1)
def _key_lookup() -> dict[tuple[str, str, str], str]:
    lex = load_lexicon()
    return {
        (role, lang, form): c
        for role in KEY_ROLES
        for c in lex.roles[role]
        for lang in LANGS
        for form in {lex.word(c, lang), _cap(lex.word(c, lang))}
    }


def find_keys(text: str) -> set[tuple[str, str, str]]:
    """The (subject, object, place) keys of every templated sentence in ``text`` (any language).

    Used by the tests to check the held-out property on the written text itself, not on generator state.
    """
    lookup = _key_lookup()
    keys = set()
    for lang, rx in _parsers():
        for m in rx.finditer(text):
            keys.add(tuple(lookup[(role, lang, m.group(role))] for role in KEY_ROLES))
    return keys


# ----------------------------------------------------------------------------- sampling
class _Sampler:
    def __init__(self, lex: Lexicon, seed: int, rng: random.Random):
        self.lex, self.seed, self.rng = lex, seed, rng
        self._split_cache: dict[tuple[str, str, str], bool] = {}

    def style(self) -> Style:
        r = self.rng
        return Style(
            day=r.random() < 0.6,
            filler=r.randrange(4) if r.random() < 0.5 else None,
            main_first=r.random() < 0.7,
        )

    def fact(self, key: tuple[str, str, str], verb: str | None = None) -> Fact:
        r, roles = self.rng, self.lex.roles
        return Fact(
            subj=key[0],
            verb=verb or r.choice(roles["verb"]),
            obj=key[1],
            place=key[2],
            adj=r.choice(roles["adj"]),
            num=r.choice(roles["num"]),
            time=r.choice(roles["time"]),
        )

    def is_eval(self, key: tuple[str, str, str]) -> bool:
        hit = self._split_cache.get(key)
        if hit is None:
            hit = self._split_cache[key] = is_eval_key(key, self.seed)
        return hit

    def random_key(self, *, split: str) -> tuple[str, str, str]:
        want_eval = split == "eval"
        while True:
            key = tuple(self.rng.choice(self.lex.roles[r]) for r in KEY_ROLES)
            if self.is_eval(key) == want_eval:
                return key

    def neighbour_key(
        self, key: tuple[str, str, str], *, split: str, exclude: set | None = None
    ) -> tuple | None:
        """A key of ``split`` that differs from ``key`` in exactly one of its three concepts (None if none is left)."""
        want_eval = split == "eval"
        for _ in range(200):  # rejection sampling: cheap, and ~10% of the neighbours are in the eval split
            i = self.rng.randrange(3)
            c = self.rng.choice(self.lex.roles[KEY_ROLES[i]])
            k = key[:i] + (c,) + key[i + 1 :]
            if c != key[i] and self.is_eval(k) == want_eval and (exclude is None or k not in exclude):
                return k
        cands = [
            k
            for i, role in enumerate(KEY_ROLES)
            for c in self.lex.roles[role]
            if c != key[i]
            for k in [key[:i] + (c,) + key[i + 1 :]]
            if self.is_eval(k) == want_eval and (exclude is None or k not in exclude)
        ]
        return self.rng.choice(cands) if cands else None

    def other_lang(self, lang: str) -> str:
        return self.rng.choice([x for x in LANGS if x != lang])


def _teacher_score(query: Fact, cand: Fact, rng: random.Random) -> float:
    """Stand-in for a cross-encoder logit: concept overlap (subject, verb, object, place) plus noise."""
    overlap = sum(getattr(query, r) == getattr(cand, r) for r in ("subj", "verb", "obj", "place")) / 4
    return round(10.0 * overlap - 2.0 + rng.gauss(0.0, 1.0), 3)


def _pretrain(s: _Sampler, n: int) -> list[dict]:
    r, out = s.rng, []
    for _ in range(n):
        lang = r.choice(LANGS)
        fact = s.fact(s.random_key(split="train"))
        style = s.style()
        u = r.random()
        if u < 0.4:
            source = "sample/title-body"
            roles = ["subj", "verb", "obj", "place"]
            chosen = r.sample(roles, r.randint(2, 4))
            query = render_title([getattr(fact, x) for x in chosen], lang, s.lex)
            plang = lang if r.random() < 0.5 else s.other_lang(lang)
        elif u < 0.7:
            source = "sample/translation"
            query = render_passage(fact, lang, style, s.lex)
            plang = s.other_lang(lang)
        else:
            source = "sample/question"
            query = render_question(fact, lang, s.lex)
            plang = lang if r.random() < 0.5 else s.other_lang(lang)
        out.append(
            {
                "query": query,
                "positive": render_passage(fact, plang, style, s.lex),
                "lang": lang,
                "source": source,
                "_keys": [fact.key],
            }
        )
    return out


def _finetune(s: _Sampler, n: int, n_neg: int) -> list[dict]:
    r, out = s.rng, []
    for _ in range(n):
        lang = r.choice(LANGS)
        fact = s.fact(s.random_key(split="train"))
        plang = lang if r.random() < 0.5 else s.other_lang(lang)
        negs: list[Fact] = []
        seen = {fact.key}
        while len(negs) < n_neg:
            k = s.neighbour_key(fact.key, split="train", exclude=seen) or s.random_key(split="train")
            seen.add(k)
            # about one in four hard negatives keeps the verb too (overlap 3/4): harder, and a graded teacher
            negs.append(s.fact(k, verb=fact.verb if r.random() < 0.25 else None))
        cands = [fact, *negs]
        # hard negatives are mostly in the positive's language (what a retriever would surface)
        langs = [plang] + [plang if r.random() < 0.8 else r.choice(LANGS) for _ in negs]
        texts = [render_passage(c, cl, s.style(), s.lex) for c, cl in zip(cands, langs, strict=True)]
        out.append(
            {
                "query": render_question(fact, lang, s.lex),
                "positive": texts[0],
                "negatives": texts[1:],
                "teacher_scores": [_teacher_score(fact, c, r) for c in cands],
                "lang": lang,
                "source": "sample/qa",
                "_keys": [c.key for c in cands],
            }
        )
    return out


def _eval(s: _Sampler, n_per_lang: int) -> tuple[list[dict], list[dict], list[tuple[str, str, int]]]:
    r = s.rng
    query_keys: set = set()
    plan = []  # (query lang, fact, passage langs)
    for lang in LANGS:
        for _ in range(n_per_lang):
            key = s.random_key(split="eval")
            while key in query_keys:
                key = s.random_key(split="eval")
            query_keys.add(key)
            kind = r.randrange(3)  # 0: same language, 1: same + another, 2: another only (cross-lingual)
            other = s.other_lang(lang)
            plang = [lang] if kind == 0 else [lang, other] if kind == 1 else [other]
            plan.append((lang, s.fact(key), plang))

    corpus: list[dict] = []
    queries: list[dict] = []
    qrels: list[tuple[str, str, int]] = []
    used_keys: set = set(query_keys)  # distractors never reuse a query's key or another distractor's

    def add_passage(fact: Fact, lang: str, style: Style) -> str:
        pid = f"d{len(corpus):05d}"
        corpus.append(
            {
                "_id": pid,
                "title": render_title([fact.place], lang, s.lex),
                "text": render_passage(fact, lang, style, s.lex),
                "lang": lang,
                "_keys": [fact.key],
            }
        )
        return pid

    for qi, (lang, fact, plangs) in enumerate(plan):
        qid = f"q{qi:04d}"
        queries.append(
            {"_id": qid, "text": render_question(fact, lang, s.lex), "lang": lang, "_keys": [fact.key]}
        )
        style = s.style()
        for pl in plangs:
            qrels.append((qid, add_passage(fact, pl, style), 1))
        for _ in range(N_DISTRACTORS):
            k = s.neighbour_key(fact.key, split="eval", exclude=used_keys)
            if k is None:
                continue
            used_keys.add(k)
            dlang = r.choice(plangs) if r.random() < 0.7 else r.choice(LANGS)
            add_passage(s.fact(k), dlang, s.style())
    for _ in range(N_BACKGROUND):
        k = s.random_key(split="eval")
        if k in query_keys:
            continue
        add_passage(s.fact(k), r.choice(LANGS), s.style())

    # shuffle the corpus order, then renumber so ids carry no hint of relevance
    order = list(range(len(corpus)))
    r.shuffle(order)
    renamed = {corpus[old]["_id"]: f"d{new:05d}" for new, old in enumerate(order)}
    corpus = [dict(corpus[old], _id=renamed[corpus[old]["_id"]]) for old in order]
    qrels = sorted((q, renamed[d], score) for q, d, score in qrels)
    return corpus, queries, qrels


# ----------------------------------------------------------------------------- writing
def _save_records(path: Path, records: Iterable[dict]) -> None:
    """One JSON line per record (its private ``_`` keys left out, ``_id`` kept), written atomically."""

    def lines(fh) -> None:
        for rec in records:
            public = {k: v for k, v in rec.items() if not k.startswith("_") or k == "_id"}
            fh.write((json.dumps(public, ensure_ascii=False) + "\n").encode("utf-8"))

    write_atomic(path, lines)


OUTPUT_FILES = (
    "pretrain.jsonl",
    "finetune.jsonl",
    "eval/corpus.jsonl",
    "eval/queries.jsonl",
    "eval/qrels/test.tsv",
)


def check_sample_folder(out_dir: str | os.PathLike) -> None:
    """``out_dir`` may receive generated data: it is absent, empty, or a folder this generator wrote (it has
    the generator's ``manifest.json``). Anything else is a :class:`DataError`: me5 never writes into a folder of
    someone's own data."""
    out = Path(out_dir)
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError("the sample data folder is a file", file=str(out))
    if (out / "manifest.json").is_file() or not any(out.iterdir()):
        return
    raise DataError("not a folder of generated sample data (no manifest.json) and not empty: the sample source "
                    "does not write into it; to train on your own files use data=files data.pretrain.path=...",
                    file=str(out))


def generate_sample_data(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    n_pretrain: int = 20000,
    n_finetune: int = 5000,
    n_eval_queries_per_lang: int = 60,
    n_hard_negatives: int = 3,
    force: bool = False,
) -> dict:
    """Write the sample data set to ``out_dir`` (see the module docstring) and return its stats.

    Idempotent: when ``out_dir/manifest.json`` records the same generator version, seed and sizes and every
    file is present, nothing is written and the recorded stats are returned (with ``"skipped": True``).
    """
    for name, value, low in (
        ("n_pretrain", n_pretrain, 1),
        ("n_finetune", n_finetune, 1),
        ("n_eval_queries_per_lang", n_eval_queries_per_lang, 1),
        ("n_hard_negatives", n_hard_negatives, 0),
    ):
        if not isinstance(value, int) or value < low:
            raise ConfigError(f"data.synthetic.{name}", f"must be an integer >= {low}, got {value!r}")
    if n_eval_queries_per_lang > MAX_EVAL_QUERIES_PER_LANG:
        raise ConfigError(
            "data.synthetic.n_eval_queries_per_lang",
            f"at most {MAX_EVAL_QUERIES_PER_LANG} (the held-out key space is ~7k triples), got {n_eval_queries_per_lang}",
        )
    check_sample_folder(out_dir)
    out = Path(out_dir)
    params = {
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "n_pretrain": n_pretrain,
        "n_finetune": n_finetune,
        "n_eval_queries_per_lang": n_eval_queries_per_lang,
        "n_hard_negatives": n_hard_negatives,
    }
    manifest_path = out / "manifest.json"
    if not force and manifest_path.is_file() and all((out / f).is_file() for f in OUTPUT_FILES):
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            manifest = {}
        if manifest.get("params") == params:
            return dict(manifest["stats"], out_dir=str(out), skipped=True)

    lex = load_lexicon()
    pre = _pretrain(_Sampler(lex, seed, random.Random(f"me5-synthetic/{seed}/pretrain")), n_pretrain)
    fin = _finetune(
        _Sampler(lex, seed, random.Random(f"me5-synthetic/{seed}/finetune")), n_finetune, n_hard_negatives
    )
    corpus, queries, qrels = _eval(
        _Sampler(lex, seed, random.Random(f"me5-synthetic/{seed}/eval/{n_eval_queries_per_lang}")),
        n_eval_queries_per_lang,
    )

    # The held-out property, checked on the generator's own bookkeeping (tests re-check it on the text).
    train_keys = {k for rec in pre + fin for k in rec["_keys"]}
    eval_keys = {k for rec in corpus + queries for k in rec["_keys"]}
    assert not train_keys & eval_keys, "an eval (subject, object, place) key leaked into the training files"
    assert all(is_eval_key(k, seed) for k in eval_keys) and not any(is_eval_key(k, seed) for k in train_keys)

    (out / "eval" / "qrels").mkdir(parents=True, exist_ok=True)
    _save_records(out / "pretrain.jsonl", pre)
    _save_records(out / "finetune.jsonl", fin)
    _save_records(out / "eval" / "corpus.jsonl", corpus)
    _save_records(out / "eval" / "queries.jsonl", queries)
    write_text(
        out / "eval" / "qrels" / "test.tsv",
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels),
    )

    corpus_lang = {d["_id"]: d["lang"] for d in corpus}
    qlang = {q["_id"]: q["lang"] for q in queries}
    rel_langs: dict[str, set] = {}
    for q, d, _ in qrels:
        rel_langs.setdefault(q, set()).add(corpus_lang[d])
    stats = {
        "pretrain": {
            "examples": len(pre),
            "by_lang": dict(sorted(Counter(r["lang"] for r in pre).items())),
            "by_source": dict(sorted(Counter(r["source"] for r in pre).items())),
        },
        "finetune": {
            "examples": len(fin),
            "hard_negatives": n_hard_negatives,
            "by_lang": dict(sorted(Counter(r["lang"] for r in fin).items())),
        },
        "eval": {
            "queries": len(queries),
            "corpus": len(corpus),
            "qrels": len(qrels),
            "queries_by_lang": dict(sorted(Counter(q["lang"] for q in queries).items())),
            "corpus_by_lang": dict(sorted(Counter(d["lang"] for d in corpus).items())),
            "cross_lingual_queries": sum(qlang[q] not in langs for q, langs in rel_langs.items()),
        },
        "held_out_keys": {"train": len(train_keys), "eval": len(eval_keys), "overlap": 0},
    }
    write_text(
        manifest_path, json.dumps({"params": params, "stats": stats}, ensure_ascii=False, indent=2) + "\n"
    )
    return dict(stats, out_dir=str(out), skipped=False)
