"""Tiny, download-free building blocks for the module / distributed / benchmark tests.

A word-level tokenizer over ``w0 .. w299``, a 2-layer XLM-R-shaped encoder, and collator-shaped batches
(docs/ARCHITECTURE.md, "The batch") with planted duplicate passages.
"""

from __future__ import annotations

import functools
import random

import torch

from me5.data.collate import text_hash
from me5.losses import InfoNCE, KLDistillation, WeightedLoss
from me5.models.encoder import Encoder

VOCAB_WORDS = 300


@functools.cache
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(VOCAB_WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def encoder(dropout: float = 0.1, seed: int = 0) -> Encoder:
    torch.manual_seed(seed)
    enc = Encoder.from_scratch(
        tokenizer=tokenizer(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return enc.train()


def loss(stage: str) -> WeightedLoss:
    """Stage 1: InfoNCE with a learnable temperature; stage 2: InfoNCE + KD (the configs' terms)."""
    if stage == "pretrain":
        return WeightedLoss({"infonce": InfoNCE(temperature=0.05, learnable_temperature=True)}, {"infonce": 1.0})
    return WeightedLoss(
        {"infonce": InfoNCE(temperature=0.05), "kd": KLDistillation(temperature=0.05)}, {"infonce": 0.2, "kd": 1.0}
    )


def texts(n: int, lo: int, hi: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(VOCAB_WORDS)}" for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def corpus(n: int = 24, seed: int = 3) -> tuple[list[str], list[str]]:
    """A corpus of ``n`` texts of 1-40 words: its ids ``doc0 ..`` and texts."""
    return [f"doc{i}" for i in range(n)], texts(n, 1, 40, seed=seed)


def batch_from_texts(queries: list[str], passages: list[str], group: int, teacher=None) -> dict:
    """What ``PairCollator`` returns, from already-formatted texts (right padding)."""
    tok = tokenizer()
    q = tok(queries, padding=True, return_tensors="pt")
    p = tok(passages, padding=True, return_tensors="pt")
    out = {
        "query_input_ids": q["input_ids"],
        "query_attention_mask": q["attention_mask"],
        "passage_input_ids": p["input_ids"],
        "passage_attention_mask": p["attention_mask"],
        "group_size": group,
        "passage_hash": torch.tensor([text_hash(t) for t in passages], dtype=torch.long),
        "n_truncated_queries": 0,
        "n_truncated_passages": 0,
    }
    if teacher is not None:
        out["teacher_scores"] = teacher
    return out


def union_texts(n_queries: int, group: int, seed: int = 0) -> tuple[list[str], list[str], torch.Tensor]:
    """Queries, query-major passages (positive first) and teacher scores, with planted duplicate passages.

    Planted: passage column 1*G (query 1's positive) is a copy of query 0's positive, and the last query's
    positive is a copy of query 2's positive -- with two ranks of n/2 queries, the latter pair sits on
    different ranks.
    """
    queries = texts(n_queries, 2, 8, seed=seed + 1)
    passages = texts(n_queries * group, 3, 14, seed=seed + 2)
    passages[1 * group] = passages[0]
    passages[(n_queries - 1) * group] = passages[2 * group]
    teacher = torch.randn(n_queries, group, generator=torch.Generator().manual_seed(seed + 3)) * 2
    return queries, passages, teacher


def shard(queries, passages, teacher, group: int, rank: int, world: int):
    b = len(queries) // world
    return (
        queries[rank * b : (rank + 1) * b],
        passages[rank * b * group : (rank + 1) * b * group],
        teacher[rank * b : (rank + 1) * b],
    )


def planted_duplicate_columns(passages: list[str], group: int, n_queries: int) -> dict[int, set[int]]:
    """query index -> the columns that hold a copy of its positive (other than the positive itself)."""
    out = {}
    for i in range(n_queries):
        pos = i * group
        out[i] = {j for j, t in enumerate(passages) if t == passages[pos] and j != pos}
    return out


def take_grads(*modules) -> dict[str, torch.Tensor | None]:
    """The parameters' gradients of ``modules``, cloned, by name (``<module index>.<name>`` for several modules);
    the gradients are cleared."""
    out = {}
    for i, module in enumerate(modules):
        for name, p in module.named_parameters():
            out[f"{i}.{name}" if len(modules) > 1 else name] = None if p.grad is None else p.grad.detach().clone()
            p.grad = None
    return out


def assert_grads_close(got, want, atol=1e-5):
    """Same parameters, same gradients (more than 10 of them non-empty); an absent gradient only matches zeros."""
    assert got.keys() == want.keys()
    assert sum(g is not None for g in want.values()) > 10
    for name in want:
        if want[name] is None:
            assert got[name] is None or not got[name].any(), name
        else:
            assert got[name] is not None, name
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------- more tokenizers and models
def wordlevel_tokenizer():
    """A word-level tokenizer (``w0 .. w199`` and a few words in other scripts) with XLM-R's special tokens and
    template (``<s> ... </s>``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(200)] + ["query:", "passage:", "кошка", "猫", "قطة", "बिल्ली"]
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", mask_token="<mask>", cls_token="<s>", sep_token="</s>",
                                   model_max_length=64)


SENTENCES = [
    "the cat sits on the mat",
    "a dog runs in the park",
    "der Hund läuft im Park",
    "die Katze schläft auf dem Sofa",
    "le chat dort sur le canapé",
    "el perro come su comida",
    "il gatto dorme sul divano",
    "o cachorro corre no parque",
    "кошка спит на диване",
    "собака бежит в парке",
    "猫はソファで寝ている",
    "犬が公園を走っている",
    "고양이가 소파에서 잔다",
    "القطة تنام على الأريكة",
    "बिल्ली सोफे पर सो रही है",
]


def build_tokenizer(out_dir):
    """An XLM-R-style Unigram tokenizer trained on ~50 multilingual sentences (:data:`SENTENCES`), saved to
    ``out_dir``."""
    from me5.models.tokenizer import train_unigram_tokenizer

    texts = [s for s in SENTENCES for _ in range(3)] + [s.upper() for s in SENTENCES[:5]]
    return train_unigram_tokenizer(texts, out_dir, vocab_size=300, model_max_length=128)


def build_tiny_encoder(tokenizer, pooling="mean", normalize=True, seed=0) -> Encoder:
    """A 2-layer XLM-R encoder (hidden 64) over ``tokenizer``, in eval mode."""
    torch.manual_seed(seed)
    return Encoder.from_scratch(
        tokenizer=tokenizer,
        model_type="xlm-roberta",
        pooling=pooling,
        normalize=normalize,
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=128,
    ).eval()


def pair_tokenizer():
    """:func:`tokenizer`'s word-level vocabulary with a pair template (``<s> A </s> B </s>``, B of segment 1) that
    returns segment ids, as a BERT cross-encoder's tokenizer does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(VOCAB_WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B:1 </s>:1", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=128,
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def build_cross_encoder(folder, *, num_labels: int = 1, seed: int = 0):
    """A 2-layer BertForSequenceClassification (hidden 32) with its tokenizer, saved to ``folder``."""
    from transformers import BertConfig, BertForSequenceClassification

    tok = pair_tokenizer()
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, type_vocab_size=2, num_labels=num_labels,
                     pad_token_id=tok.pad_token_id, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     initializer_range=0.5)  # wide weights: scores that differ (0.02 gives ~constant logits)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
