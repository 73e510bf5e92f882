"""Test helpers: compose the real conf/ through Hydra's compose API."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def compose_cfg(overrides: list[str] | None = None, *, tmp_path: Path | None = None) -> DictConfig:
    """The app's config with ``overrides``; run folder and data under ``tmp_path`` when given."""
    overrides = list(overrides or [])
    if tmp_path is not None:
        overrides += [f"paths.output_dir={tmp_path / 'run'}", f"paths.log_dir={tmp_path / 'logs'}"]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("config", overrides=overrides)
    return cfg


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def to_plain(cfg: DictConfig) -> dict:
    with open_dict(cfg):
        return OmegaConf.to_container(cfg, resolve=True)


# ---------------------------------------------------------------------------------------------- data
SOURCE_KWARGS = {"name", "data_files", "hub_config", "split", "lang", "max_examples", "max_chars", "symmetric", "task",
                 "instruction", "strict", "size"}


def one_source(path_or_source, **kwargs):
    """A :class:`~me5.data.PairDataModule` of one source: a :class:`~me5.data.Source` given, or one built from a
    path with the Source keyword arguments among ``kwargs`` (the rest go to the DataModule)."""
    from me5.data import PairDataModule, Source

    src_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in SOURCE_KWARGS}
    src = path_or_source if isinstance(path_or_source, Source) else Source(str(path_or_source), **src_kw)
    return PairDataModule({src.name: src}, **kwargs)


def connect(dm, tokenizer, *, global_batch_size: int = 8, world_size: int = 1, prompt_style: str = "e5", **kwargs):
    """``dm.connect`` with a batch plan of ``global_batch_size`` over ``world_size`` devices; returns ``dm``."""
    from me5.batching import BatchPlan
    from me5.prompts import PromptPolicy

    dm.connect(tokenizer, batch_plan=BatchPlan.build(global_batch_size=global_batch_size, world_size=world_size),
               prompts=PromptPolicy(prompt_style), **kwargs)
    return dm


def format_item(source, ex, *, n_negatives: int = 0, rng=None, prompt_style: str = "e5"):
    """One training item of ``source`` under a prompt style (what the DataModule's streams produce)."""
    import numpy as np

    from me5.data import ItemFormatter
    from me5.prompts import PromptPolicy

    fmt = ItemFormatter.for_source(source, prompts=PromptPolicy(prompt_style), n_negatives=n_negatives)
    return fmt(ex, rng=rng if rng is not None else np.random.default_rng(0))


def write_jsonl(path: Path, records) -> Path:
    """``records`` as JSON lines at ``path`` (its folder made); returns ``path``."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def pairs(n, *, prefix="w", negs=0, lang="en"):
    """``n`` normalised records over the words ``<prefix>0 .. <prefix>199`` (with ``negs`` negatives and teacher
    scores when asked)."""
    out = []
    for i in range(n):
        r = {"query": f"{prefix}{i % 200}", "positive": f"{prefix}{(i + 1) % 200} {prefix}{(i + 2) % 200}", "lang": lang}
        if negs:
            r["negatives"] = [f"{prefix}{(i + 3 + k) % 200}" for k in range(negs)]
            r["teacher_scores"] = [5.0] + [1.0 - k for k in range(negs)]
        out.append(r)
    return out


def bad_records_file(folder: Path) -> Path:
    """``folder/bad.jsonl``: 4 good English pairs, then one bad record of each kind (lines 5-13: malformed JSON,
    a missing field, an empty text, a wrong type, a too-long text, a Cyrillic query declared English, a language
    not asked for, bad teacher scores, undecodable bytes)."""
    import json

    lines = [json.dumps(r, ensure_ascii=False) for r in pairs(4, lang="en")]
    lines += [
        '{"query": "w1", "positive": ',  # 5 malformed JSON
        json.dumps({"query": "w1"}),  # 6 missing field
        json.dumps({"query": "   ", "positive": "w2"}),  # 7 empty text
        json.dumps({"query": "w1", "positive": 3}),  # 8 wrong type
        json.dumps({"query": "w1", "positive": "w2 " * 50}),  # 9 too long
        json.dumps({"query": "кошка", "positive": "w2", "lang": "en"}),  # 10 Cyrillic query declared English
        json.dumps({"query": "w1", "positive": "w2", "lang": "ja"}),  # 11 language not asked for
        json.dumps({"query": "w1", "positive": "w2", "negatives": ["w3"], "teacher_scores": [1.0]}),  # 12
    ]
    p = folder / "bad.jsonl"
    p.write_bytes(("\n".join(lines) + "\n").encode() + b'{"query": "\xff\xfe", "positive": "w"}\n')  # 13 undecodable
    return p


def saved_model_folder(path: Path, style: str) -> Path:
    """A model folder whose ``me5.json`` holds only its prompt policy (all ``read_saved_settings`` reads there)."""
    import json

    from me5.prompts import PromptPolicy

    path.mkdir(parents=True)
    (path / "me5.json").write_text(json.dumps({"prompts": PromptPolicy(style).to_dict()}), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- evaluation
CORPUS = [
    {"_id": "d1", "title": "Cats", "text": "t1 cats purr", "lang": "en"},
    {"_id": "d2", "title": "", "text": "t2 dogs bark", "lang": "en"},
    {"_id": "d3", "title": "Katzen", "text": "t3 Katzen schnurren", "lang": "de"},
    {"_id": "d4", "title": None, "text": "t4 Hunde bellen", "lang": "de"},
    {"_id": "d5", "text": "t5 unrelated", "lang": "en"},
]
QUERIES = [
    {"_id": "q1", "text": "t1 what do cats do", "lang": "en"},
    {"_id": "q2", "text": "t2 what do dogs do", "lang": "en"},
    {"_id": "q3", "text": "t3 was machen Katzen", "lang": "de"},
    {"_id": "q4", "text": "t4 was machen Hunde", "lang": "de"},
    {"_id": "q5", "text": "t5 not judged in this split", "lang": "de"},
]
QRELS = [("q1", "d1", 1), ("q2", "d2", 2), ("q3", "d3", 1), ("q4", "d4", 1), ("q4", "d2", 0)]


def write_beir(root, corpus=CORPUS, queries=QUERIES, qrels=QRELS, split="test"):
    """Write a BEIR folder; ``qrels`` rows are tuples or raw lines."""
    import json

    (root / "qrels").mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus), encoding="utf-8")
    (root / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries), encoding="utf-8")
    lines = ["query-id\tcorpus-id\tscore"] + [
        r if isinstance(r, str) else "\t".join(map(str, r)) for r in qrels
    ]
    (root / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


class SlowEvaluator:
    """An evaluator (built from the ``eval`` group like the real ones) that takes ``seconds`` on its first call
    in a run folder, on every rank: a stand-in for an hours-long MIRACL pass. Returns the rank and world size
    it saw, so a test can tell that every rank evaluated."""

    def __init__(self, seconds: float, marker: str, prompts=None):
        self.seconds, self.marker = float(seconds), Path(marker)

    def evaluate(self, encoder, tokenizer, *, device=None, show_progress: bool = False) -> dict[str, float]:
        import time

        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        first = not self.marker.with_suffix(f".{rank}").exists()
        if first:
            time.sleep(self.seconds)
            self.marker.with_suffix(f".{rank}").touch()
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        return {"slow/ranks": float(world), f"slow/rank{rank}_slept": float(first)}


# ---------------------------------------------------------------------------------------------- processes
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_and_join(fn, args: tuple, timeout_s: int, what: str, nprocs: int = 2) -> None:
    """Run ``fn(rank, *args)`` on ``nprocs`` spawned processes; fail the test (killing them) after ``timeout_s``."""
    import time

    import pytest
    import torch.multiprocessing as mp

    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"the {what} did not finish in {timeout_s} s")


class Background:
    """Commands started ahead of the tests that read them: at most ``slots`` at a time, in the order submitted,
    each in its own session (closing kills what it started, children included). A module's CLI runs (each
    mostly one process importing and starting up, or waiting) then run beside its in-process tests; a test
    waits for its own run with :meth:`result`, which returns what ``subprocess.run(..., capture_output=True,
    text=True, timeout=...)`` would (or raises its ``TimeoutExpired``)."""

    def __init__(self, slots: int = 2):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="background")
        self._futures: dict = {}
        self._procs: list = []
        self._closed = False

    def submit(self, name: str, cmd: list[str], *, timeout: float, **popen_kwargs):
        """Queue ``cmd``; returns its future (a done-callback runs before the slot takes its next command)."""
        assert name not in self._futures, name
        self._futures[name] = self._pool.submit(self._run, cmd, timeout, popen_kwargs)
        return self._futures[name]

    def result(self, name: str):
        return self._futures[name].result()

    def _run(self, cmd, timeout, popen_kwargs):
        import subprocess

        if self._closed:
            raise RuntimeError("closed")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, **popen_kwargs)
        self._procs.append(proc)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill(proc)
            proc.communicate()
            raise
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    @staticmethod
    def _kill(proc) -> None:
        import os
        import signal

        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the process and whatever it started
        except ProcessLookupError:
            pass

    def close(self) -> None:
        """Cancel what has not started; kill what is still running (a test that failed early leaves nothing
        behind)."""
        self._closed = True
        for fut in self._futures.values():
            fut.cancel()
        for proc in self._procs:  # its group, even when it has ended: a child it started may live on
            self._kill(proc)
        self._pool.shutdown(wait=True)


# ---------------------------------------------------------------------------------------------- preemption
class SignalAtStep:
    """A callback that sends this process ``signal`` when step ``step`` starts (once per ``marker`` file): a
    preemption (SIGTERM), or a node dying (SIGKILL), at a step the test chooses."""

    def __new__(cls, *args, **kwargs):
        from lightning.pytorch.callbacks import Callback

        class _SignalAtStep(Callback):
            def __init__(self, step: int, signal: str, marker: str):
                self.step, self.signal, self.marker = int(step), signal, Path(marker)

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                import os
                import signal as _signal

                if trainer.global_step == self.step and not self.marker.exists():
                    self.marker.touch()
                    os.kill(os.getpid(), getattr(_signal, self.signal))

        return _SignalAtStep(*args, **kwargs)


class NaNGradsAt:
    """A callback that makes the gradients NaN at the given steps (after the backward, before the guard)."""

    def __new__(cls, *args, **kwargs):
        from lightning.pytorch.callbacks import Callback

        class _NaNGradsAt(Callback):
            def __init__(self, steps):
                self.steps = {int(s) for s in steps}

            def on_after_backward(self, trainer, pl_module) -> None:
                if trainer.global_step in self.steps:
                    p = next(q for q in pl_module.parameters() if q.grad is not None)
                    p.grad.fill_(float("nan"))

        return _NaNGradsAt(*args, **kwargs)


# ---------------------------------------------------------------------------------------------- raw source fixtures
FIXTURES = Path(__file__).resolve().parent / "fixtures"
RAW_STAGE1 = FIXTURES / "raw" / "stage1"
RAW_STAGE2 = FIXTURES / "raw" / "stage2"


def make_source(cls, kwargs, **extra):
    """``cls(**kwargs, **extra)`` with the paths of ``kwargs`` as strings."""
    return cls(**{k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()}, **extra)


def stage1_cases() -> list[tuple]:
    """Every stage-1 source on its raw fixture (``RAW_STAGE1``): ``(id, class, constructor kwargs, expected
    examples, expected counts)`` (tests/test_sources_stage1.py checks them; tests/test_prep.py prepares them)."""
    from me5.data.schema import PairExample
    from me5.data.sources import (
        CCNewsPairs,
        MC4Pairs,
        NLLBPairs,
        RedditPairs,
        S2ORCPairs,
        SbertPairs,
        StackExchangePairs,
        WikipediaPairs,
        XP3Pairs,
    )

    RAW = RAW_STAGE1

    def ex(query, positive, lang, source, negatives=()):
        return PairExample(query, positive, tuple(negatives), None, lang, source)

    return [
        (
            "wikipedia-en",
            WikipediaPairs,
            dict(path=RAW / "wikipedia" / "20231101.en"),
            [
                ex("Anarchism", "Anarchism is a political philosophy and movement that is skeptical of all justifications for authority.", "en", "wikipedia"),
                ex("Albedo", "Albedo is the fraction of sunlight that is diffusely reflected by a body.", "en", "wikipedia"),
            ],
            {"read": 3, "kept": 2, "skipped/empty_text": 1},
        ),
        (
            "wikipedia-ja-fulltext",
            WikipediaPairs,
            dict(path=RAW / "wikipedia" / "20231101.ja", lang="ja", passage="text"),
            [ex("東京", "東京は日本の首都である。\n\n歴史\n\n江戸時代には江戸と呼ばれた。", "ja", "wikipedia")],
            {"read": 2, "kept": 1, "skipped/empty_title": 1},
        ),
        (
            "mc4-first-line",
            MC4Pairs,
            dict(path=RAW / "mc4", data_files="c4-es.*.json", lang="es"),
            [
                ex("Receta de tortilla española",
                   "La tortilla de patatas es un plato típico de España.\nSe prepara con huevos y patatas.", "es", "mc4"),
            ],
            {"read": 3, "kept": 1, "skipped/single_line": 1, "skipped/title_too_long": 1},
        ),
        (
            "mc4-url",
            MC4Pairs,
            dict(path=RAW / "mc4", data_files="c4-*.json", title_from="url", lang="es"),
            [
                ex("tortilla espanola",
                   "Receta de tortilla española\nLa tortilla de patatas es un plato típico de España.\nSe prepara con huevos y patatas.",
                   "es", "mc4"),
                ex("novyj park", "Новости Москвы\nВ Москве открылся новый парк.", "es", "mc4"),
            ],
            {"read": 4, "kept": 2, "skipped/no_url_title": 2},
        ),
        (
            "mc4-ru",
            MC4Pairs,
            dict(path=RAW / "mc4" / "c4-ru.tfrecord-00000-of-01024.json", lang="ru"),
            [ex("Новости Москвы", "В Москве открылся новый парк.", "ru", "mc4")],
            {"read": 1, "kept": 1},
        ),
        (
            "cc_news-fr",
            CCNewsPairs,
            dict(path=RAW / "cc_news" / "2021" / "fr.jsonl", lang="fr"),
            [
                ex("Le Parlement adopte la réforme des retraites",
                   "Les députés ont adopté mardi en première lecture le projet de loi sur les retraites.", "fr", "cc_news"),
            ],
            {"read": 2, "kept": 1, "skipped/empty_maintext": 1},
        ),
        (
            "cc_news-zh",
            CCNewsPairs,
            dict(path=RAW / "cc_news" / "2021", data_files="zh.jsonl", lang="zh"),
            [ex("北京发布新的交通规划", "北京市政府周一发布了新的城市交通规划。", "zh", "cc_news")],
            {"read": 1, "kept": 1},
        ),
        (
            "nllb-eng-fra",
            NLLBPairs,
            dict(path=RAW / "nllb" / "eng_Latn-fra_Latn.jsonl", hub_config="eng_Latn-fra_Latn", min_laser_score=1.06),
            [
                ex("The cat sleeps on the sofa.", "Le chat dort sur le canapé.", "eng_Latn-fra_Latn", "nllb"),
                ex("Water boils at 100 degrees.", "L'eau bout à 100 degrés.", "eng_Latn-fra_Latn", "nllb"),
            ],
            {"read": 4, "kept": 2, "skipped/low_laser_score": 1, "skipped/identical": 1},
        ),
        (
            "nllb-reverse-direction",
            NLLBPairs,
            dict(path=RAW / "nllb" / "eng_Latn-fra_Latn.jsonl", src_lang="fra_Latn", tgt_lang="eng_Latn", max_examples=1),
            [ex("Le chat dort sur le canapé.", "The cat sleeps on the sofa.", "fra_Latn-eng_Latn", "nllb")],
            {"read": 1, "kept": 1},
        ),
        (
            "nllb-arabic-keys-from-record",
            NLLBPairs,
            dict(path=RAW / "nllb" / "arb_Arab-eng_Latn.jsonl"),
            [ex("الكتاب على الطاولة.", "The book is on the table.", "arb_Arab-eng_Latn", "nllb")],
            {"read": 1, "kept": 1},
        ),
        (
            "reddit",
            RedditPairs,
            dict(path=RAW / "reddit"),
            [
                ex("Why is the sky blue during the day?", "Rayleigh scattering: shorter wavelengths scatter much more.", "en", "reddit"),
                ex("Thanks, that helps a lot!", "You're welcome.", "en", "reddit"),
            ],
            {"read": 5, "kept": 2, "skipped/low_score": 1, "skipped/deleted": 1, "skipped/comment_too_long": 1},
        ),
        (
            "s2orc-title-abstract",
            S2ORCPairs,
            dict(path=RAW / "s2orc" / "title-abstract-pair"),
            [
                ex("Attention Is All You Need", "The dominant sequence transduction models are based on complex recurrent networks.", "en", "s2orc"),
                ex("Deep Residual Learning for Image Recognition", "Deeper neural networks are more difficult to train.", "en", "s2orc"),
            ],
            {"read": 3, "kept": 2, "skipped/empty_abstract": 1},
        ),
        (
            "s2orc-title-citation",
            S2ORCPairs,
            dict(path=RAW / "s2orc" / "title-citation-pair", mode="title-citation"),
            [ex("BERT: Pre-training of Deep Bidirectional Transformers", "Attention Is All You Need", "en", "s2orc")],
            {"read": 1, "kept": 1},
        ),
        (
            "s2orc-abstract-citation",
            S2ORCPairs,
            dict(path=RAW / "s2orc" / "abstract-citation-pair", mode="abstract-citation"),
            [ex("We introduce a new language representation model.",
                "The dominant sequence transduction models are based on recurrent networks.", "en", "s2orc")],
            {"read": 2, "kept": 1, "skipped/empty_citation": 1},
        ),
        (
            "stackexchange",
            StackExchangePairs,
            dict(path=RAW / "stackexchange", data_files=["apple.jsonl", "stackapps.jsonl"]),
            [
                ex("How do I take a screenshot on a Mac? I need to capture only part of the screen.",
                   "Press Shift-Command-4 and drag to select the area.", "en", "stackexchange"),
                ex("Is there a Stack Exchange icon available? StackAuth /sites route provides all icons except one.",
                   "Here it is! Dead link: SVG version here.", "en", "stackexchange",
                   negatives=["No, the /sites route is not the right place for that."]),
            ],
            {"read": 3, "kept": 2, "skipped/empty_upvoted_answer": 1},
        ),
        (
            "stackexchange-ru",
            StackExchangePairs,
            dict(path=RAW / "stackexchange" / "ru.jsonl", lang="ru"),
            [ex("Как отсортировать словарь по значению в Python? Нужен порядок по возрастанию.",
                "Используйте sorted(d.items(), key=lambda kv: kv[1]).", "ru", "stackexchange")],
            {"read": 1, "kept": 1},
        ),
        (
            "xp3-fr",
            XP3Pairs,
            dict(path=RAW / "xp3" / "fr", lang="fr"),
            [ex("Phrase 1 : Il était spécialiste de la littérature métaphysique.\nPhrase 2 : Il était spécialiste de "
                "littérature métaphysique. Question : peut-on réécrire la phrase 1 en phrase 2 ? Oui ou non ?", "Oui", "fr", "xp3")],
            {"read": 2, "kept": 1, "skipped/empty_targets": 1},
        ),
        (
            "xp3-hi",
            XP3Pairs,
            dict(path=RAW / "xp3" / "hi" / "merged_hi.jsonl", lang="hi"),
            [ex("इस वाक्य का सारांश लिखें: भारत एक विशाल देश है जिसकी संस्कृति विविध है।",
                "भारत विविध संस्कृति वाला विशाल देश है।", "hi", "xp3")],
            {"read": 1, "kept": 1},
        ),
        (
            "sbert",
            SbertPairs,
            dict(path=RAW / "sbert"),
            [
                ex("How do I learn Python quickly?", "What is the fastest way to learn Python?", "en", "sbert"),
                ex("A man is playing a guitar.", "A person plays an instrument.", "en", "sbert", negatives=["A woman is sleeping."]),
                ex("what is a lagoon", "A lagoon is a shallow body of water separated from a larger sea.", "en", "sbert"),
                ex("symptoms of flu", "Fever, cough and aches are common flu symptoms.", "en", "sbert",
                   negatives=["The flu shot is given yearly."]),
                ex("What is the capital of France?", "Which city is France's capital?", "en", "sbert"),
            ],
            {"read": 6, "kept": 5, "skipped/too_few_texts": 1},
        ),
    ]


MANHATTAN = "The presence of communication amid scientific minds was equally important to the success of the Manhattan Project as scientific intellect was."
SPUTNIK = "The Launch of Sputnik, 1957. The Soviets responded with yet another launch, and the space race continued."
BOMB = "The Manhattan Project and its atomic bomb helped bring an end to World War II."
JUSTICE_Q = "_________ justice is designed to repair the harm to victim, the community and the offender caused by the offender criminal act."
HOLIDAY_POS = "根据国务院规定，全体公民放假的节日共有11天。"
HOLIDAY_NEG = ["春节是中国最重要的传统节日。", "周末双休日不属于法定节假日。"]
PASSPORT_POS = "办理护照需要携带身份证到出入境管理部门申请。"


def stage2_cases() -> list:
    """Every stage-2 source on its raw fixture (``RAW_STAGE2``): ``pytest.param(class, path under RAW_STAGE2,
    constructor kwargs, expected (query, positive, negatives, teacher scores, lang), expected counts)``
    (tests/test_sources_stage2.py checks them; tests/test_prep.py prepares them)."""
    import pytest

    from me5.data.sources.stage2 import (
        ELI5,
        FEVER,
        MIRACL,
        NLI,
        DuReader,
        HotpotQA,
        MrTyDi,
        MSMarcoDocument,
        MSMarcoPassage,
        NaturalQuestions,
        NLLBSupervised,
        QuoraDuplicates,
        SQuAD,
        TriviaQA,
    )

    def ex(query, positive, negatives=(), scores=None, lang="en"):
        return (query, positive, tuple(negatives), None if scores is None else tuple(scores), lang)

    return [
        pytest.param(
            MSMarcoPassage, "msmarco_passage/train.jsonl", {"strict": False},
            [
                ex(")what was the immediate impact of the success of the manhattan project?", MANHATTAN, [SPUTNIK, BOMB]),
                ex(
                    JUSTICE_Q,
                    "Restorative justice is an approach to justice that focuses on repairing the harm caused by crime.",
                    [
                        "Distributive justice deals with the fairness of the distribution of benefits or burdens.",
                        "The criminal justice system consists of three main parts: legislative, adjudication and corrections.",
                    ],
                    scores=[9.5, 3.25, 1.0],
                ),
            ],
            # a positive without its raw "text": missing_field (the one taxonomy of me5.data.records)
            {"read": 4, "kept": 2, "skipped/no_positive": 1, "skipped/missing_field": 1},
            id="msmarco_passage",
        ),
        pytest.param(
            MSMarcoDocument, "msmarco_document/msmarco_document.jsonl", {},
            [
                ex("how long is a cat pregnant", "Cat Pregnancy Cats are pregnant for about 63 to 65 days, roughly nine weeks.",
                   ["Dog Pregnancy Dogs are pregnant for about 63 days from conception."]),
                ex("what is the capital of peru", "Lima - Wikipedia Lima is the capital and the largest city of Peru.",
                   ["Cusco - Wikipedia Cusco was the capital of the Inca Empire."]),
            ],
            {"read": 2, "kept": 2},
            id="msmarco_document",
        ),
        pytest.param(
            NaturalQuestions, "nq/train.jsonl", {},
            [
                ex("big little lies season 2 how many episodes",
                   "Big Little Lies (TV series) The second season of Big Little Lies consists of seven episodes.",
                   ["Little Big Man (film) Little Big Man is a 1970 American western film.",
                    "Big Little Lies (novel) Big Little Lies is a 2014 novel by Liane Moriarty."]),
            ],
            {"read": 2, "kept": 1, "skipped/empty_negative": 1},
            id="nq",
        ),
        pytest.param(
            TriviaQA, "triviaqa/train.jsonl", {},
            [
                ex("Which Lloyd Webber musical premiered in the US on 10th December 1993?",
                   "Sunset Boulevard (musical) Sunset Boulevard is a musical with music by Andrew Lloyd Webber that opened on "
                   "Broadway in 1994 after its 1993 US premiere in Los Angeles.",
                   ["Cats (musical) Cats is a sung-through musical composed by Andrew Lloyd Webber."]),
            ],
            {"read": 1, "kept": 1},
            id="triviaqa",
        ),
        pytest.param(
            SQuAD, "squad/train.parquet", {},
            [
                ex("What sits on top of the Main Building at Notre Dame?",
                   "University of Notre Dame Architecturally, the school has a Catholic character. Atop the Main Building's "
                   "gold dome is a golden statue of the Virgin Mary."),
                ex("When did Beyonce start becoming popular?",
                   "Beyoncé Beyoncé Giselle Knowles-Carter is an American singer, songwriter, record producer and actress."),
            ],
            {"read": 2, "kept": 2},
            id="squad",
        ),
        pytest.param(
            NLI, "nli", {},  # a folder of parquet shards, as a hub snapshot is
            [
                ex("A person on a horse jumps over a broken down airplane.", "A person is outdoors, on a horse.",
                   ["A person is at a diner, ordering an omelette."]),
                ex("Children smiling and waving at camera", "There are children present", ["The kids are frowning"]),
            ],
            {"read": 2, "kept": 2},
            id="nli",
        ),
        pytest.param(
            ELI5, "eli5/train.parquet", {},
            [ex("Why do we get goosebumps?",
                "Tiny muscles at the base of each hair contract, a leftover reflex from furrier ancestors.")],
            {"read": 2, "kept": 1, "skipped/empty_answer": 1},
            id="eli5",
        ),
        pytest.param(
            NLLBSupervised, "nllb/eng_Latn-fra_Latn.jsonl", {"min_laser_score": 1.1},
            [
                ex("The cat sleeps on the sofa.", "Le chat dort sur le canapé.", lang="eng_Latn-fra_Latn"),
                ex("Where is the train station?", "Où est la gare ?", lang="eng_Latn-fra_Latn"),
            ],
            {"read": 3, "kept": 2, "skipped/low_laser_score": 1},
            id="nllb",
        ),
        pytest.param(
            DuReader, "dureader/train.jsonl", {},
            [ex("国家法定节假日共多少天", HOLIDAY_POS, HOLIDAY_NEG, lang="zh"), ex("如何办理护照", PASSPORT_POS, lang="zh")],
            {"read": 2, "kept": 2},
            id="dureader",
        ),
        pytest.param(
            DuReader, "dureader/bge-m3/dureader_len-0-500.jsonl", {},  # FlagEmbedding layout, teacher scores
            [
                ex("国家法定节假日共多少天", HOLIDAY_POS, HOLIDAY_NEG, scores=[0.97, 0.12, 0.34], lang="zh"),
                ex("如何办理护照", PASSPORT_POS, ["身份证补办流程。"], scores=[0.91, 0.05], lang="zh"),
            ],
            {"read": 2, "kept": 2},
            id="dureader_bge",
        ),
        pytest.param(
            FEVER, "fever/train.parquet", {},
            [
                ex("Nikolaj Coster-Waldau worked with the Fox Broadcasting Company.",
                   "Nikolaj Coster-Waldau Nikolaj William Coster-Waldau is a Danish actor who starred in the Fox television film Virtuality.",
                   ["Fox Broadcasting Company The Fox Broadcasting Company is an American television network.",
                    "Game of Thrones Game of Thrones is an American fantasy drama television series."]),
                ex("Roman Atwood is a content creator.",
                   "Roman Atwood Roman Bernard Atwood is an American YouTube personality and prankster.",
                   ["YouTube YouTube is an American video-sharing website."]),
            ],
            {"read": 2, "kept": 2},
            id="fever",
        ),
        pytest.param(
            HotpotQA, "hotpotqa/train.parquet", {},
            [
                ex("Which magazine was started first Arthur's Magazine or First for Women?",
                   "Arthur's Magazine Arthur's Magazine (1844-1846) was an American literary periodical.",
                   ["Women's Health Women's Health is a magazine on health published by Hearst."]),
            ],
            {"read": 2, "kept": 1, "skipped/no_positive": 1},
            id="hotpotqa",
        ),
        pytest.param(
            QuoraDuplicates, "quora/train.parquet", {},
            [
                ex("Astrology: I am a Capricorn Sun Cap moon and cap rising...what does that say about me?",
                   "I'm a triple Capricorn (Sun, Moon and ascendant in Capricorn) What does this say about me?",
                   ["What is the best way to learn astrology?"]),
                ex("How can I be a good geologist?", "What should I do to be a great geologist?",
                   ["How can I become a good software engineer?"]),
            ],
            {"read": 2, "kept": 2},
            id="quora",
        ),
        pytest.param(
            MrTyDi, "mrtydi/train.jsonl", {"lang": "ja"},
            [
                ex("日本の首都はどこですか？", "東京都 東京都は日本の首都であり、関東地方に位置する。",
                   ["京都市 京都市は794年から1869年まで日本の首都であった。"], lang="ja"),
                ex("富士山の高さは？", "富士山 富士山は標高3776メートルの日本最高峰である。", lang="ja"),
            ],
            {"read": 2, "kept": 2},
            id="mrtydi",
        ),
        pytest.param(
            MIRACL, "miracl/train.jsonl", {"lang": "sw", "strict": False},
            [
                ex("Je, Mlima Kilimanjaro una urefu gani?",
                   "Kilimanjaro Kilimanjaro ni mlima mrefu kuliko yote barani Afrika, wenye urefu wa mita 5,895.",
                   ["Mlima Kenya Mlima Kenya ni mlima mrefu wa pili barani Afrika."], lang="sw"),
                ex("Mji mkuu wa Tanzania ni upi?", "Dodoma Dodoma ni mji mkuu wa Tanzania.",  # the first positive only
                   ["Dar es Salaam Dar es Salaam ni jiji kubwa zaidi nchini Tanzania."], lang="sw"),
            ],
            # a negative that is an int: the layout's "expected a passage object or a string" is a bad_type
            {"read": 3, "kept": 2, "skipped/bad_type": 1},
            id="miracl",
        ),
    ]
