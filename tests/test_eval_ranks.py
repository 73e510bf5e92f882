"""Evaluation across ranks: each rank reads and encodes only its part of a corpus file (``CorpusPart``, with a
digest that hashes no text), and the pipeline's shared mode runs rank-0-only evaluators (MTEB, bitext) on rank 0
while the others wait past the process group's timeout.

Spawned workers import this module: keep it light at module level (no Lightning, no me5.data beyond readers).
"""

from __future__ import annotations

import gzip
import json
import os
import time
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist

from me5.distributed import shutdown_process_group
from me5.embed.encode import EmbeddingShards, RankRows, encode_corpus
from me5.errors import ConfigError, DataError
from me5.eval.retrieval import CorpusPart, LazyLanguages, RetrievalEvaluator, load_beir, read_corpus_part
from me5.export import export_encoder
from me5.prompts import PromptPolicy

E5 = PromptPolicy("e5")
DOCS = [{"_id": f"d{i}", "title": f"title {i}" if i % 3 else None, "text": f"text number {i} " * (1 + i % 4)}
        for i in range(11)]


def _write_corpus(path, docs=DOCS):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(d) + "\n" for d in docs))
    return path


def _passage(d) -> str:
    return ((d["title"] or "") + " " + d["text"]).strip()


# ---------------------------------------------------------------------------------------------- reading a part
def test_each_rank_reads_its_rows_and_the_same_digest(tmp_path):
    path = _write_corpus(tmp_path / "corpus.jsonl.gz")
    judged = {"d3", "d10", "missing"}
    parts = [read_corpus_part(path, rank=r, world=3, judged=judged) for r in range(3)]
    for r, (part, found) in enumerate(parts):
        assert isinstance(part, CorpusPart) and (part.n, part.rank, part.world) == (11, r, 3)
        assert part.ids == [d["_id"] for d in DOCS[r::3]]  # this rank's rows only ...
        assert part.texts == [_passage(d) for d in DOCS[r::3]]  # ... and their text, nothing else
        assert found == {"d3", "d10"}  # the judged ids of the whole file, on every rank
    assert len({p.digest for p, _ in parts}) == 1
    whole, _ = read_corpus_part(path, rank=0, world=1)
    assert whole.ids == [d["_id"] for d in DOCS] and whole.digest == parts[0][0].digest

    # the digest: the file's size and time and its ids, not its texts
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert read_corpus_part(path, rank=0, world=1)[0].digest != whole.digest
    swapped = [dict(d) for d in DOCS]
    swapped[0]["_id"], swapped[1]["_id"] = "d1", "d0"
    other = _write_corpus(tmp_path / "b" / "corpus.jsonl.gz", swapped)
    os.utime(other, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert os.path.getsize(other) == os.path.getsize(path)
    assert read_corpus_part(other, rank=0, world=1)[0].digest != read_corpus_part(path, rank=0, world=1)[0].digest


def test_a_part_is_checked_like_the_whole_file(tmp_path):
    dup = _write_corpus(tmp_path / "dup" / "corpus.jsonl.gz", [*DOCS[:5], dict(DOCS[2], text="again")])
    with pytest.raises(DataError, match=r"corpus\.jsonl\.gz:6.*duplicate _id 'd2'"):
        read_corpus_part(dup, rank=1, world=2)  # d2 is rank 0's row, the copy rank 1's: found all the same
    bad = _write_corpus(tmp_path / "bad" / "corpus.jsonl.gz", [*DOCS[:3], {"_id": "x", "text": 7}])
    with pytest.raises(DataError, match=r":4.*text"):
        read_corpus_part(bad, rank=0, world=2)  # a line of the other rank's is checked too
    with pytest.raises(ConfigError, match="eval.rank"):
        read_corpus_part(bad, rank=2, world=2)


def test_lazy_part_keeps_the_queries_and_judgments_of_the_full_load(tmp_path):
    root = tmp_path / "miracl"
    _write_corpus(root / "xx" / "corpus.jsonl.gz")
    (root / "xx" / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": f"query {i}"}) + "\n"
                                                       for i in range(4)))
    (root / "xx" / "qrels").mkdir()
    (root / "xx" / "qrels" / "dev.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq0\td1\t1\nq0\td4\t1\nq1\tnot-a-doc\t1\nq2\td10\t0\nq2\tnot-a-doc\t1\n")
    lazy = load_beir(root, split="dev", lazy=True)
    full = lazy["xx"]
    for rank in (0, 1):
        part = lazy.load("xx", part=(rank, 2))
        assert (part.queries, part.qrels) == (full.queries, full.qrels)  # q1 dropped, q2 keeps d10 only
        assert part.corpus.ids == list(full.corpus)[rank::2]


# ---------------------------------------------------------------------------------------------- encoding a part
def _tiny():
    from tests import tiny

    return tiny.encoder(dropout=0.0, seed=0).eval(), tiny.tokenizer()


def test_rank_rows_encode_the_same_shards_as_the_whole_corpus(tmp_path):
    """Two ranks, run one after the other here, each given only its rows (RankRows), write the folder that the
    same ranks write when each is given the whole corpus: the partial read changes nothing but memory."""
    from tests import tiny

    enc, tok = _tiny()
    ids, texts = [f"doc{i}" for i in range(13)], tiny.texts(13, 1, 30, seed=1)
    kw = {"max_length": 32, "max_batch": 3, "shard_rows": 2, "split": "strided", "world": 2, "barrier": False,
          "corpus_key": "k1"}
    for r in (0, 1):
        rows = range(r, 13, 2)
        encode_corpus(enc, tok, RankRows(13, rows, ids[r::2]), RankRows(13, rows, texts[r::2]), tmp_path / "part",
                      rank=r, **kw)
        encode_corpus(enc, tok, ids, texts, tmp_path / "whole", rank=r, **kw)
    part, whole = EmbeddingShards(tmp_path / "part"), EmbeddingShards(tmp_path / "whole")
    assert part.ids == whole.ids and sorted(part.ids) == sorted(ids)
    assert np.array_equal(part.matrix(order="input"), whole.matrix(order="input"))
    with pytest.raises(ConfigError, match="embed.corpus_key"):
        encode_corpus(enc, tok, RankRows(13, range(0, 13, 2), ids[::2]), texts, tmp_path / "x", rank=0, world=2,
                      split="strided")
    with pytest.raises(ConfigError, match=r"embed.texts.*rank 1 of 2"):
        encode_corpus(enc, tok, ids, RankRows(13, range(0, 13, 2), texts[::2]), tmp_path / "x", rank=1, world=2,
                      split="strided", corpus_key="k")
    with pytest.raises(IndexError, match="row 1 is not held here"):
        RankRows(13, range(0, 13, 2), ids[::2])[1]


# ---------------------------------------------------------------------------------------------- the pipeline
@pytest.fixture(scope="module")
def miracl_and_model(tmp_path_factory):
    """MIRACL fixtures in the published layout, converted (sw, te), and a tiny exported model."""
    from me5.eval.miracl import convert_miracl
    from tests.helpers import ROOT
    from tests.tiny import build_tiny_encoder, build_tokenizer

    fx = ROOT / "tests" / "fixtures" / "miracl"
    root = tmp_path_factory.mktemp("eval")
    convert_miracl(fx / "miracl-corpus", fx / "miracl", root / "miracl", progress=False, languages=["sw", "te"])
    tok = build_tokenizer(tmp_path_factory.mktemp("tok"))
    model = export_encoder(build_tiny_encoder(tok), tok, tmp_path_factory.mktemp("export") / "tiny",
                           prompts=PromptPolicy("e5"))
    return root, model


def _miracl_evaluator(root, work_dir) -> RetrievalEvaluator:
    # one text per batch: a text's embedding is then the same bits whichever rank encodes it with whichever others
    return RetrievalEvaluator(load_beir(root / "miracl", split="dev", lazy=True), name="miracl", task="miracl",
                              query_max_length=64, passage_max_length=64, batch_size=1, shard_rows=3,
                              work_dir=work_dir, prompts=E5)


class _Probe:
    """An evaluator that says where it ran, after ``sleep_s``; without ``shares_ranks`` (an evaluator that may
    use collectives) it runs on every rank."""

    def __init__(self, out_dir: str, name: str, sleep_s: float = 0.0):
        self.out_dir, self.name, self.sleep_s = out_dir, name, sleep_s

    def evaluate(self, encoder, tokenizer, *, device=None, show_progress=False):
        open(os.path.join(self.out_dir, f"{self.name}-ran-on-{dist.get_rank()}"), "w").close()
        time.sleep(self.sleep_s)
        return {f"{self.name}/score": 0.25, f"{self.name}/world": float(dist.get_world_size())}


class _Rank0Probe(_Probe):
    """Takes longer than the process group's timeout, on one rank (as MTEB and bitext mining declare)."""

    shares_ranks = False


PG_TIMEOUT_S, PROBE_S = 5, 7


def _pipeline_worker(rank: int, port: int, root: str, model: str, out_dir: str) -> None:
    from pathlib import Path

    from me5.eval.suite import evaluate_all
    from me5.models.saved import load_model, read_saved_settings

    torch.set_num_threads(1)
    held: list = []
    load = LazyLanguages.load

    def spy(self, lang, *, part=None):
        data = load(self, lang, part=part)
        held.append([lang, list(part), len(data.corpus.texts), data.corpus.n])
        return data

    LazyLanguages.load = spy
    encoder, tokenizer, _ = load_model(model, read_saved_settings(model), "cpu")
    evaluators = {"miracl": _miracl_evaluator(Path(root), f"{out_dir}/work"),
                  "slow": _Rank0Probe(out_dir, "slow", PROBE_S), "any": _Probe(out_dir, "any")}
    # a short timeout: a rank waiting in a collective of this group while rank 0 runs the probe would fail
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=PG_TIMEOUT_S))
    try:
        metrics = evaluate_all(evaluators, encoder, tokenizer)
        dist.barrier()  # the training group still works afterwards
        with open(f"{out_dir}/rank{rank}.json", "w") as fh:
            json.dump({"metrics": metrics, "held": held}, fh)
    finally:
        shutdown_process_group()
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_shared_evaluation_parts_the_corpus_and_runs_rank0_evaluators_alone(miracl_and_model, tmp_path):
    """eval_after=shared on 2 gloo ranks: MIRACL's corpora are read, encoded and searched in parts (each rank holds
    its rows' text only), a rank-0 evaluator that outlasts the group's timeout runs on rank 0 alone while rank 1
    waits, one without ``shares_ranks`` runs on both, and both ranks end with the same metrics, MIRACL's equal to
    one process's."""
    from me5.eval.bitext import BitextEvaluator
    from me5.eval.mteb import MtebEvaluator
    from me5.eval.suite import evaluate_all
    from me5.models.saved import load_model, read_saved_settings
    from tests.helpers import free_port, spawn_and_join

    root, model = miracl_and_model
    t0 = time.monotonic()
    spawn_and_join(_pipeline_worker, (free_port(), str(root), str(model), str(tmp_path)), 180, "evaluation workers")
    assert time.monotonic() - t0 > PROBE_S
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(p.name for p in tmp_path.glob("*-ran-on-*")) == ["any-ran-on-0", "any-ran-on-1", "slow-ran-on-0"]
    assert ranks[0]["metrics"] == ranks[1]["metrics"] and ranks[0]["metrics"]["slow/world"] == 2
    assert list(ranks[0]["metrics"])[-4:] == ["slow/score", "slow/world", "any/score", "any/world"]  # config order
    assert MtebEvaluator.shares_ranks is False and BitextEvaluator.shares_ranks is False  # rank 0 alone, as the probe
    for r in (0, 1):
        assert [h[:2] for h in ranks[r]["held"]] == [["sw", [r, 2]], ["te", [r, 2]]]
        assert all(h[2] == len(range(r, h[3], 2)) for h in ranks[r]["held"])  # its rows' texts, no more
    for lang in ("sw", "te"):
        written = {p.name.split("-")[1] for p in (tmp_path / "work" / "miracl" / lang).glob("emb-*.npy")}
        assert written == {"r0", "r1"}

    encoder, tokenizer, _ = load_model(str(model), read_saved_settings(model), "cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = evaluate_all({"miracl": _miracl_evaluator(root, tmp_path / "one")}, encoder, tokenizer)
    finally:
        torch.set_num_threads(threads)
    got = {k: v for k, v in ranks[0]["metrics"].items() if k.startswith("miracl/")}
    assert got.keys() == one.keys() and {"miracl/sw/ndcg@10", "miracl/te/recall@100"} <= set(one)
    assert got == pytest.approx(one, abs=1e-12)
    assert 0 < one["miracl/ndcg@10"] < 1
