"""MTEB English through the ``mteb`` package (mteb 2): an me5 encoder wrapper, the paper's 56 tasks, offline runs.

The paper (mE5 technical report, Table 7) reports the 56 datasets of the MTEB English v1 benchmark as of early 2024:
12 classification, 11 clustering, 3 pair classification, 4 reranking, 15 retrieval (CQADupStack counted once),
10 STS and 1 summarization. :data:`PAPER_MTEB_EN` names them; in mteb 2.26 the same names are valid and form the
benchmark ``MTEB(eng, v1)``, which also fixes the splits and subsets that the v1 leaderboard used (MSMARCO ``dev``,
AmazonCounterfactual ``en``, STS17 ``en-en``, STS22 ``en``, the ``en`` subset of the multilingual
Amazon/MTOP/MASSIVE tasks). :func:`paper_tasks` returns those task objects.

:class:`Me5MtebEncoder` applies E5's evaluation policy, as microsoft/unilm ``e5/`` runs it:

* **Retrieval** (``mteb_beir_eval.py``): queries get the policy's query prompt, documents its document prompt
  (E5: ``query: `` / ``passage: ``; instruct: the task's instruction on queries, nothing on documents). mteb says
  which side a text is on through ``prompt_type``. Documents are ``(title + " " + text).strip()`` in both.
* **QuoraRetrieval** (``mteb_beir_eval.py``: ``doc_as_query = task in ['QuoraRetrieval']``): documents are embedded
  as queries (the query prompt on both sides).
* **Every other task type** (``mteb_except_retrieval_eval.py``: one ``prompt`` for every text): the query prompt on
  every input (E5: ``query: ``; instruct: ``get_detailed_instruct(task_def)``). That script also runs
  **Reranking**, through mteb v1's plain ``encode`` (no query/document sides), so reranking queries and candidates
  both get the query prompt; ``asymmetric_reranking=True`` gives them the retrieval sides instead (what mteb 2's
  reranking-as-retrieval would do with a query/document model).
* **Classification**: no L2 normalisation (``mteb_except_retrieval_eval.py``: "disable l2 normalize for
  classification tasks"); every other task type gets unit vectors, whatever the encoder's own ``normalize`` flag.

The task instructions (instruct policy) are unilm ``e5/utils.py`` ``get_task_def_by_task_name_and_type``, for the
56 tasks (:data:`TASK_INSTRUCTIONS` and :data:`TYPE_INSTRUCTIONS`); a task outside them falls back to mteb's own
task prompt (mteb took those from E5-mistral) or, failing that, its description [U]. Every prompt string comes from
:class:`me5.prompts.PromptPolicy`.

:func:`evaluate_mteb` runs ``mteb.evaluate`` offline: datasets come from the local Hugging Face datasets cache, and
a task whose data is not there is a :class:`~me5.errors.DataError` naming the task and its dataset id. Scores are
mteb's (fractions, not the paper's percentages): per task mteb 2's main score and the paper's metric, which is the
same but for pair classification (mteb 1's cosine AP where mteb 2 reports ``max_ap``; the evidence is in
:mod:`me5.eval.paper`). It can go on from the tasks a previous run finished (``done``) and reports each task as it
finishes (``on_task``), so that a caller can write it out.

:func:`missing_data` / :func:`check_data` find, in milliseconds and without loading anything, the tasks whose datasets
an offline run could not read (not in the datasets cache, nor at the pinned revision in the hub cache), so that a
missing one is an error before any encoding; :func:`download` fetches them once with network access.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from me5.embed.encode import encode_texts
from me5.errors import ConfigError, DataError
from me5.eval.paper import PAPER_MTEB_EN as _PAPER_MTEB_EN
from me5.eval.paper import PAPER_MTEB_EN_BY_TYPE as _PAPER_MTEB_EN_BY_TYPE
from me5.eval.paper import mteb_task_key
from me5.models.encoder import model_max_length
from me5.models.saved import load_model, read_saved_settings
from me5.prompts import PromptPolicy

try:
    import mteb
    from mteb.abstasks import AbsTask
    from mteb.abstasks.aggregated_task import AbsTaskAggregate
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ModelMeta
    from mteb.types import PromptType
except ImportError as err:  # pragma: no cover - mteb is in the dev dependencies
    raise ImportError("me5.eval.mteb needs the mteb package (pip install 'mteb>=2'; it is in me5's dev extra)") from err

log = logging.getLogger(__name__)

#: the mteb benchmark that holds the paper's 56 tasks with the v1 leaderboard's splits and subsets
PAPER_BENCHMARK = "MTEB(eng, v1)"

#: the 56 English datasets of mE5 Table 7 by task type, and in one list (defined with the paper's numbers, in
#: :mod:`me5.eval.paper`, which imports no mteb)
PAPER_MTEB_EN_BY_TYPE = _PAPER_MTEB_EN_BY_TYPE
PAPER_MTEB_EN: list[str] = list(_PAPER_MTEB_EN)
#: the metric of mteb's scores that the paper reports, where it is not mteb 2's main score (see :mod:`me5.eval.paper`:
#: mteb 1's pair classification main score was the cosine AP, mteb 2's is ``max_ap``)
PAPER_METRIC_BY_TYPE: dict[str, str] = {"PairClassification": "cosine_ap"}

#: task definitions of the instruct policy: unilm ``e5/utils.py`` ``get_task_def_by_task_name_and_type``
#: (E5-mistral, arXiv 2401.00368, Table 13), for every task of :data:`PAPER_MTEB_EN`
TASK_INSTRUCTIONS: dict[str, str] = {
    # Classification
    "AmazonCounterfactualClassification":
        "Classify a given Amazon customer review text as either counterfactual or not-counterfactual",
    "AmazonPolarityClassification": "Classify Amazon reviews into positive or negative sentiment",
    "AmazonReviewsClassification": "Classify the given Amazon review into its appropriate rating category",
    "Banking77Classification": "Given a online banking query, find the corresponding intents",
    "EmotionClassification": "Classify the emotion expressed in the given Twitter message into one of the six "
                             "emotions: anger, fear, joy, love, sadness, and surprise",
    "ImdbClassification": "Classify the sentiment expressed in the given movie review text from the IMDB dataset",
    "MassiveIntentClassification": "Given a user utterance as query, find the user intents",
    "MassiveScenarioClassification": "Given a user utterance as query, find the user scenarios",
    "MTOPDomainClassification": "Classify the intent domain of the given utterance in task-oriented conversation",
    "MTOPIntentClassification": "Classify the intent of the given utterance in task-oriented conversation",
    "ToxicConversationsClassification": "Classify the given comments as either toxic or not toxic",
    "TweetSentimentExtractionClassification":
        "Classify the sentiment of a given tweet as either positive, negative, or neutral",
    # Clustering
    "ArxivClusteringP2P": "Identify the main and secondary category of Arxiv papers based on the titles and abstracts",
    "ArxivClusteringS2S": "Identify the main and secondary category of Arxiv papers based on the titles",
    "BiorxivClusteringP2P": "Identify the main category of Biorxiv papers based on the titles and abstracts",
    "BiorxivClusteringS2S": "Identify the main category of Biorxiv papers based on the titles",
    "MedrxivClusteringP2P": "Identify the main category of Medrxiv papers based on the titles and abstracts",
    "MedrxivClusteringS2S": "Identify the main category of Medrxiv papers based on the titles",
    "RedditClustering": "Identify the topic or theme of Reddit posts based on the titles",
    "RedditClusteringP2P": "Identify the topic or theme of Reddit posts based on the titles and posts",
    "StackExchangeClustering": "Identify the topic or theme of StackExchange posts based on the titles",
    "StackExchangeClusteringP2P": "Identify the topic or theme of StackExchange posts based on the given paragraphs",
    "TwentyNewsgroupsClustering": "Identify the topic or theme of the given news articles",
    # Reranking and PairClassification
    "AskUbuntuDupQuestions": "Retrieve duplicate questions from AskUbuntu forum",
    "MindSmallReranking": "Retrieve relevant news articles based on user browsing history",
    "SciDocsRR": "Given a title of a scientific paper, retrieve the titles of other relevant papers",
    "StackOverflowDupQuestions": "Retrieve duplicate questions from StackOverflow forum",
    "SprintDuplicateQuestions": "Retrieve duplicate questions from Sprint forum",
    "TwitterSemEval2015": "Retrieve tweets that are semantically similar to the given tweet",
    "TwitterURLCorpus": "Retrieve tweets that are semantically similar to the given tweet",
    # Retrieval (CQADupstack*: CQADUPSTACK_INSTRUCTION)
    "ArguAna": "Given a claim, find documents that refute the claim",
    "ClimateFEVER": "Given a claim about climate change, retrieve documents that support or refute the claim",
    "DBPedia": "Given a query, retrieve relevant entity descriptions from DBPedia",
    "FEVER": "Given a claim, retrieve documents that support or refute the claim",
    "FiQA2018": "Given a financial question, retrieve user replies that best answer the question",
    "HotpotQA": "Given a multi-hop question, retrieve documents that can help answer the question",
    "MSMARCO": "Given a web search query, retrieve relevant passages that answer the query",
    "NFCorpus": "Given a question, retrieve relevant documents that best answer the question",
    "NQ": "Given a question, retrieve Wikipedia passages that answer the question",
    "QuoraRetrieval": "Given a question, retrieve questions that are semantically equivalent to the given question",
    "SCIDOCS": "Given a scientific paper title, retrieve paper abstracts that are cited by the given paper",
    "SciFact": "Given a scientific claim, retrieve documents that support or refute the claim",
    "Touche2020": "Given a question, retrieve detailed and persuasive arguments that answer the question",
    "TRECCOVID": "Given a query on COVID-19, retrieve documents that answer the query",
}
#: unilm: ``if task_name.lower().startswith('cqadupstack')`` (the 12 forums of the CQADupstackRetrieval aggregate)
CQADUPSTACK_INSTRUCTION = (
    "Given a question, retrieve detailed question descriptions from Stackexchange that are duplicates to the given "
    "question"
)
#: unilm: one definition per task type for these types (every STS task, SummEval, any bitext task)
TYPE_INSTRUCTIONS: dict[str, str] = {
    "STS": "Retrieve semantically similar text.",
    "Summarization": "Given a news summary, retrieve other semantically similar summaries",
    "BitextMining": "Retrieve parallel sentences.",
}

#: task types whose texts have a query side and a document side (unilm ``mteb_beir_eval.py``)
RETRIEVAL_TYPES = frozenset({"Retrieval"})
#: retrieval tasks whose documents are embedded as queries (unilm ``mteb_beir_eval.py`` ``doc_as_query``)
DOC_AS_QUERY_TASKS = frozenset({"QuoraRetrieval"})
#: task types embedded without L2 normalisation (unilm ``mteb_except_retrieval_eval.py``)
UNNORMALIZED_TYPES = frozenset({"Classification"})

_WARNED: set[str] = set()  # tasks whose fallback instruction was logged


def task_instruction_for(task_metadata, instructions: Mapping[str, str] | None = None) -> str:
    """The instruct policy's task definition of an mteb task (its metadata): ``instructions`` (overrides), then
    :data:`TASK_INSTRUCTIONS`, the CQADupStack rule, :data:`TYPE_INSTRUCTIONS`, then mteb's own prompt (its query
    side) or description [U]."""
    name, task_type = task_metadata.name, task_metadata.type
    for table in (instructions or {}, TASK_INSTRUCTIONS):
        if name in table:
            return table[name]
    if name.lower().startswith("cqadupstack"):
        return CQADUPSTACK_INSTRUCTION
    if task_type in TYPE_INSTRUCTIONS:
        return TYPE_INSTRUCTIONS[task_type]
    prompt = task_metadata.prompt
    if isinstance(prompt, Mapping):
        prompt = prompt.get(PromptType.query.value) or prompt.get(PromptType.document.value)
    text = (prompt or task_metadata.description or "").strip().rstrip(".")
    if not text:
        raise ConfigError("mteb.instructions", f"no instruction for the mteb task '{name}'; pass instructions=")
    if name not in _WARNED:
        _WARNED.add(name)
        log.warning("mteb task %s has no unilm instruction; using its mteb %s [U]: %r", name,
                    "prompt" if prompt else "description", text)
    return text


class Me5MtebEncoder(AbsEncoder):
    """An me5 :class:`~me5.models.encoder.Encoder` + tokenizer as an mteb 2 encoder, with E5's per-task prompts.

    Args:
        encoder: the encoder (any pooling; its ``normalize`` flag is overridden per task type, see the module doc).
        tokenizer: its tokenizer.
        prompts: the model's :class:`~me5.prompts.PromptPolicy` (``e5``, ``instruct`` or ``none``; required).
        name: the model's name in mteb's results (``owner/name``).
        revision: the model's revision in mteb's results.
        max_length: truncation in tokens (default: the model's own limit, :func:`me5.models.encoder.model_max_length`,
            as the export writes it; unilm uses 512).
        batch_size: encoding batch size.
        device: where to embed (default: where the encoder is).
        instructions: extra or overriding task definitions for the instruct policy, by mteb task name.
        asymmetric_reranking: give reranking queries and candidates the retrieval sides (default False: the query
            prompt on both, as unilm ran reranking).
    """

    def __init__(
        self,
        encoder,
        tokenizer,
        *,
        prompts: PromptPolicy | str,
        name: str = "me5/encoder",
        revision: str = "local",
        max_length: int | None = None,
        batch_size: int = 64,
        device: torch.device | str | None = None,
        instructions: Mapping[str, str] | None = None,
        asymmetric_reranking: bool = False,
    ):
        self.model = encoder
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.prompts = prompts if isinstance(prompts, PromptPolicy) else PromptPolicy(prompts)
        self.max_length = int(max_length) if max_length is not None else model_max_length(
            encoder.backbone.config, tokenizer)
        self.batch_size = int(batch_size)
        self.device = device
        self.instructions = dict(instructions or {})
        self.asymmetric_reranking = bool(asymmetric_reranking)
        if "/" not in name:
            name = f"me5/{name}"
        self.mteb_model_meta = ModelMeta(
            loader=None,
            name=name,
            revision=revision,
            release_date=None,
            languages=None,
            n_parameters=sum(p.numel() for p in encoder.parameters()),
            memory_usage_mb=None,
            max_tokens=self.max_length,
            embed_dim=int(encoder.dim),
            license=None,
            open_weights=None,
            public_training_code=None,
            public_training_data=None,
            framework=["PyTorch"],
            similarity_fn_name="cosine",
            use_instructions=self.prompts.style == "instruct",
            training_datasets=None,
            experiment_kwargs={"prompts": self.prompts.style},  # e5 and instruct runs get their own results
        )

    def __repr__(self) -> str:
        return f"Me5MtebEncoder({self.mteb_model_meta.name!r}, prompts={self.prompts!r})"

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, prompts: PromptPolicy | str | None = None, **kwargs
    ) -> Me5MtebEncoder:
        """Load a saved model (an export of :func:`me5.export.export_encoder`, or any folder or hub id that
        :func:`me5.models.saved.read_saved_settings` reads): pooling, normalisation, maximum length and the prompt
        policy from its saved settings (``me5.json``; else its sentence-transformers files, else the mE5 defaults:
        mean pooling, E5 prompts). ``prompts``: another policy; ``None`` (the default) is the saved model's own
        policy, read from those settings."""
        folder = Path(path).expanduser()
        settings = read_saved_settings(path)
        if folder.is_dir() and settings.source != "me5.json":
            log.warning("%s has no me5.json: %s settings (%s pooling, %s prompts)", folder, settings.source,
                        settings.pooling, settings.prompts.style)
        encoder, tokenizer, _ = load_model(str(path), settings, kwargs.get("device") or "cpu")
        kwargs.setdefault("max_length", settings.max_length)
        kwargs.setdefault("name", f"me5/{folder.name}" if folder.is_dir() else str(path))
        if settings.digest is not None:
            kwargs.setdefault("revision", settings.digest)
        return cls(encoder.eval(), tokenizer, prompts=settings.with_prompts(prompts).prompts, **kwargs)

    def with_prompts(self, prompts: PromptPolicy | str) -> Me5MtebEncoder:
        """The same encoder under another prompt policy."""
        other = copy.copy(self)
        other.prompts = prompts if isinstance(prompts, PromptPolicy) else PromptPolicy(prompts)
        other.mteb_model_meta = self.mteb_model_meta.model_copy(update={
            "use_instructions": other.prompts.style == "instruct",
            "experiment_kwargs": {"prompts": other.prompts.style},
        })
        return other

    # ------------------------------------------------------------------ the policy
    def instruction(self, task_metadata) -> str:
        """The task definition of the instruct policy for this task (see :func:`task_instruction_for`)."""
        return task_instruction_for(task_metadata, self.instructions)

    def prompt(self, task_metadata, prompt_type: PromptType | str | None = None) -> str:
        """The prompt of a text of this task on this side (``prompt_type``: ``query``, ``document`` or None)."""
        side = PromptType(prompt_type).value if prompt_type is not None else None
        instruction = self.instruction(task_metadata) if self.prompts.style == "instruct" else None
        sided = task_metadata.type in RETRIEVAL_TYPES or (
            self.asymmetric_reranking and task_metadata.type == "Reranking")
        if sided and side == PromptType.document.value:
            return self.prompts.document(instruction, symmetric=task_metadata.name in DOC_AS_QUERY_TASKS)
        return self.prompts.query(instruction)

    def normalizes(self, task_metadata) -> bool:
        """Whether this task's embeddings are L2-normalised (all but classification)."""
        return task_metadata.type not in UNNORMALIZED_TYPES

    # ------------------------------------------------------------------ mteb's entry point
    def encode(
        self,
        inputs,
        *,
        task_metadata,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs,
    ) -> np.ndarray:
        """Embed the ``text`` of every batch of ``inputs`` with this task's prompt; (N, D) float32."""
        texts: list[str] = []
        for batch in inputs:
            if "text" not in batch:
                raise ConfigError("mteb.tasks", f"{task_metadata.name}: me5 embeds text only; the batches hold "
                                                f"{sorted(batch)}")
            texts.extend(batch["text"])
        if not texts:
            return np.zeros((0, self.encoder.dim), dtype=np.float32)
        prefix = self.prompt(task_metadata, prompt_type)
        with _pooled_only(self.encoder):
            emb = encode_texts(
                self.encoder, self.tokenizer, texts, prefix=prefix, max_length=self.max_length,
                max_batch=self.batch_size, device=self.device,
                show_progress=bool(kwargs.get("show_progress_bar", False)), desc=f"{task_metadata.name} {hf_split}",
            )
        if self.normalizes(task_metadata):
            emb = F.normalize(emb.float(), dim=-1)
        return emb.float().numpy()


@contextlib.contextmanager
def _pooled_only(encoder) -> Iterator[None]:
    """The encoder returns its pooled vectors un-normalised for a while (the wrapper normalises per task)."""
    before = encoder.normalize
    encoder.normalize = False
    try:
        yield
    finally:
        encoder.normalize = before


# ---------------------------------------------------------------------------------------------- tasks
def paper_tasks() -> list[AbsTask]:
    """The task objects of :data:`PAPER_MTEB_EN`, with the v1 leaderboard's splits and subsets (fresh copies)."""
    return resolve_tasks(PAPER_MTEB_EN)


def resolve_tasks(tasks: Iterable[str | AbsTask]) -> list[AbsTask]:
    """mteb task objects for names (those of :data:`PAPER_MTEB_EN` with the benchmark's splits and subsets, others
    as the registry has them) and task objects (kept as they are); an unknown name is a :class:`ConfigError`."""
    items = list(tasks)
    if isinstance(tasks, str) or not items:
        raise ConfigError("mteb.tasks", f"need a list of mteb task names or tasks, got {tasks!r}")
    paper = {t.metadata.name: t for t in mteb.get_benchmark(PAPER_BENCHMARK).tasks}
    names = [t for t in items if isinstance(t, str)]
    unknown = []
    for name in names:
        if name not in paper:
            try:
                mteb.get_task(name)
            except KeyError:
                unknown.append(name)
    if unknown:
        raise ConfigError("mteb.tasks", f"unknown mteb task(s) {unknown} (mteb {mteb.__version__})")
    out = []
    for t in items:
        if isinstance(t, str):
            out.append(copy.deepcopy(paper[t]) if t in paper else mteb.get_task(t))
        elif isinstance(t, AbsTask):
            out.append(t)
        else:
            raise ConfigError("mteb.tasks", f"not an mteb task or task name: {t!r}")
    return out


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate_mteb(
    model,
    tasks: Iterable[str | AbsTask],
    *,
    prompts: PromptPolicy | str | None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    output_dir: str | os.PathLike | None = None,
    offline: bool = True,
    overwrite: bool = True,
    done: Mapping[str, float] | None = None,
    on_task: Callable[[str, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Run ``mteb.evaluate`` on ``tasks``; flat scores.

    Args:
        model: a :class:`Me5MtebEncoder`, an exported me5 folder (:meth:`Me5MtebEncoder.from_pretrained`), or an
            ``(encoder, tokenizer)`` pair.
        tasks: mteb task names (e.g. :data:`PAPER_MTEB_EN`) and/or task objects.
        prompts: the prompt policy. ``None`` means the model's own: a wrapper's policy, or for a folder the saved
            one (:meth:`Me5MtebEncoder.from_pretrained` reads it); an ``(encoder, tokenizer)`` pair has no policy of
            its own and needs one.
        cache_dir: the Hugging Face datasets cache to read the tasks' data from (default: the environment's,
            ``HF_DATASETS_CACHE`` / ``HF_HOME``).
        batch_size: encoding batch size.
        output_dir: where mteb writes its result files (``results/<model>/<revision>/<Task>.json``); none by default.
        offline: no network (the default): datasets only from the local cache.
        overwrite: recompute tasks that already have results in ``output_dir`` (False: reuse them).
        done: scores of tasks finished before (``mteb/<Task>/...`` keys, as this function returns them): a task
            with its ``mteb/<Task>/score`` here is not evaluated again, its scores count as they are.
        on_task: called after each task that is evaluated with ``(task name, its mteb/<Task>/... scores)``, e.g. to
            write them out before the next task starts.

    Returns:
        Per task, ``mteb/<Task>/main_score`` (mteb 2's main score, the mean over its evaluated splits and subsets)
        and ``mteb/<Task>/score`` (the paper's metric: the same, except :data:`PAPER_METRIC_BY_TYPE`); per task type
        ``mteb/avg/<type>`` (mteb's type name in lower case: ``classification``, ``pairclassification``, ``sts``,
        ...; the keys of :mod:`me5.eval.paper`) and ``mteb/avg`` over all tasks (for :data:`PAPER_MTEB_EN`: the
        paper's 56-dataset average), both means of ``score``. Values are mteb's, in [0, 1].

    Raises:
        DataError: a task's data is not in the local cache (the message names the task and its dataset id).
        ConfigError: an unknown task name or a bad argument.
    """
    wrapper = _as_wrapper(model, prompts, batch_size)
    task_list = resolve_tasks(tasks)
    seen = [t.metadata.name for t in task_list]
    dupes = sorted({n for n in seen if seen.count(n) > 1})
    if dupes:
        raise ConfigError("mteb.tasks", f"tasks listed twice: {dupes}")
    cache = None
    if output_dir is not None:
        from mteb.cache import ResultCache

        cache = ResultCache(str(Path(output_dir).expanduser()))
    out: dict[str, float] = {}
    by_type: dict[str, list[float]] = defaultdict(list)
    done = dict(done or {})
    with _hf_datasets(cache_dir, offline=offline):
        for task in task_list:
            name, task_type = task.metadata.name, task.metadata.type
            prefix = f"mteb/{name}/"
            if mteb_task_key(name) in done:
                log.info("mteb: %s is done (%.4f), not evaluated again", name, done[mteb_task_key(name)])
                scores = {k: float(v) for k, v in done.items() if k.startswith(prefix)}
            else:
                scores = _evaluate_task(wrapper, task, cache=cache, cache_dir=cache_dir, overwrite=overwrite)
                if on_task is not None:
                    on_task(name, scores)
            out.update(scores)
            by_type[task_type].append(scores[mteb_task_key(name)])
    for task_type, values in sorted(by_type.items()):
        out[f"mteb/avg/{task_type.lower()}"] = float(np.mean(values))
    out["mteb/avg"] = float(np.mean([v for values in by_type.values() for v in values]))
    return out


def _evaluate_task(wrapper, task: AbsTask, *, cache, cache_dir, overwrite: bool) -> dict[str, float]:
    """One task through ``mteb.evaluate``: ``{mteb/<Task>/main_score, mteb/<Task>/score}``."""
    name, task_type = task.metadata.name, task.metadata.type
    leaves = list(task.metadata.tasks) if isinstance(task, AbsTaskAggregate) else [task]
    try:
        for leaf in leaves:
            _load(leaf, cache_dir)
        log.info("mteb: evaluating %s (%s)", name, task_type)
        result = mteb.evaluate(
            wrapper, task, cache=cache, encode_kwargs={"batch_size": wrapper.batch_size},
            overwrite_strategy="always" if overwrite else "only-missing", show_progress_bar=False,
            raise_error=True,
        )
    finally:
        for leaf in leaves:
            if leaf.data_loaded:
                leaf.unload_data()
    (task_result,) = result.task_results
    main = float(task_result.get_score())
    metric = PAPER_METRIC_BY_TYPE.get(task_type)
    paper = main if metric is None else float(task_result.get_score(getter=lambda scores: scores[metric]))
    return {f"mteb/{name}/main_score": main, mteb_task_key(name): paper}


# ---------------------------------------------------------------------------------------------- data checks
def missing_data(tasks: Iterable[AbsTask], *, cache_dir=None, online: bool = False) -> list[str]:
    """The datasets of ``tasks`` (each leaf of an aggregate task) that an offline run cannot read, in seconds and
    without loading any: one line per dataset, naming the task, the dataset id and revision.

    A dataset counts as there when its task's data is already loaded, its ``path`` is a local folder, the
    ``datasets`` cache (``cache_dir``, default the environment's) holds a build of it (``<org>___<name>``), or the
    hub cache holds its pinned revision (``datasets--<org>--<name>/snapshots/<revision>``). With ``online``, one
    that is not there counts only when the hub does not answer for it either (``HfApi.dataset_info``).
    """
    import huggingface_hub

    ds_cache = Path(cache_dir).expanduser() if cache_dir is not None else Path(_datasets_cache())
    hub_cache = Path(huggingface_hub.constants.HF_HUB_CACHE)
    built = {p.name.lower() for p in ds_cache.iterdir()} if ds_cache.is_dir() else set()
    out = []
    for task in tasks:
        leaves = list(task.metadata.tasks) if isinstance(task, AbsTaskAggregate) else [task]
        for leaf in leaves:
            ds = leaf.metadata.dataset or {}
            path, revision = str(ds.get("path") or ""), ds.get("revision")
            if leaf.data_loaded or (path and Path(path).expanduser().is_dir()):
                continue
            if path.replace("/", "___").lower() in built:
                continue
            snapshot = hub_cache / f"datasets--{path.replace('/', '--')}" / "snapshots" / str(revision)
            if revision and snapshot.is_dir():
                continue
            what = f"mteb task '{leaf.metadata.name}': dataset '{path}' (revision {revision})"
            if online:
                try:
                    huggingface_hub.HfApi().dataset_info(path, revision=revision, timeout=10)
                    continue
                except Exception as err:  # any failure: not reachable from here
                    what += f" is not cached and not reachable ({type(err).__name__})"
            out.append(what)
    return out


def check_data(tasks: Iterable[AbsTask], *, cache_dir=None, online: bool = False) -> None:
    """:func:`missing_data` as an error: a :class:`DataError` listing every missing dataset and how to fetch them."""
    tasks = list(tasks)
    missing = missing_data(tasks, cache_dir=cache_dir, online=online)
    if not missing:
        return
    where = str(cache_dir) if cache_dir is not None else _datasets_cache()
    names = sorted({line.split("'")[1] for line in missing})
    cache_arg = f", cache_dir={str(cache_dir)!r}" if cache_dir is not None else ""
    fetch = f"python -c \"from me5.eval.mteb import download; download({names!r}{cache_arg})\""
    raise DataError(
        f"{len(missing)} MTEB dataset(s) "
        + ("missing" if online else f"not in the local Hugging Face datasets cache ({where}); the run reads them offline")
        + ":\n  " + "\n  ".join(missing)
        + f"\nFetch them once with network access (into the same cache):\n  {fetch}"
    )


def download(tasks: Iterable[str | AbsTask], *, cache_dir=None) -> None:
    """Load every dataset of ``tasks`` once with network access, into ``cache_dir`` (default: the environment's
    Hugging Face datasets cache), so that :func:`evaluate_mteb` finds them offline."""
    with _hf_datasets(cache_dir, offline=False):
        for task in resolve_tasks(tasks):
            for leaf in list(task.metadata.tasks) if isinstance(task, AbsTaskAggregate) else [task]:
                log.info("mteb: fetching %s (%s)", leaf.metadata.name, (leaf.metadata.dataset or {}).get("path"))
                leaf.load_data()
                leaf.unload_data()


class MtebEvaluator:
    """:func:`evaluate_mteb` with the evaluators' interface (``evaluate(encoder, tokenizer, device=)``), so the
    ``eval`` config group can run MTEB after a stage like retrieval and bitext mining.

    Args:
        tasks: mteb task names; ``paper`` (the default): the 56 English tasks of the paper (:data:`PAPER_MTEB_EN`).
        prompts: the run's prompt policy (required; bound by the app).
        batch_size, cache_dir, output_dir, offline: as :func:`evaluate_mteb`.

    ``check_data``: load (and drop) every task's data from the local cache when the evaluator is built -- minutes
    for the 56 tasks, but a dataset missing from the cache is then an error before training starts, not after it.
    """

    #: in a distributed job rank 0 runs MTEB alone and the others wait for its scores
    #: (:func:`me5.eval.suite.evaluate_all`): mteb's tasks do not split over ranks
    shares_ranks = False

    def __init__(self, tasks: str | Sequence[str] = "paper", *, prompts: PromptPolicy,
                 batch_size: int = 64, cache_dir: str | None = None, output_dir: str | None = None,
                 offline: bool = True, check_data: bool = False):
        names = list(PAPER_MTEB_EN) if tasks == "paper" else [tasks] if isinstance(tasks, str) else list(tasks)
        self.tasks = resolve_tasks(names)
        self.prompts = prompts
        self.batch_size, self.cache_dir, self.output_dir, self.offline = int(batch_size), cache_dir, output_dir, offline
        if check_data and offline:
            with _hf_datasets(cache_dir, offline=True):
                for task in self.tasks:
                    leaves = list(task.metadata.tasks) if isinstance(task, AbsTaskAggregate) else [task]
                    for leaf in leaves:
                        _load(leaf, cache_dir)
                        leaf.unload_data()

    def missing(self) -> list[str]:
        """The tasks' datasets an offline run could not read (:func:`missing_data`; milliseconds, nothing loaded)."""
        return missing_data(self.tasks, cache_dir=self.cache_dir, online=not self.offline)

    def evaluate(self, encoder, tokenizer, *, device=None, show_progress: bool = False) -> dict[str, float]:
        wrapper = Me5MtebEncoder(encoder, tokenizer, prompts=self.prompts, device=device, batch_size=self.batch_size)
        return evaluate_mteb(wrapper, self.tasks, prompts=self.prompts, cache_dir=self.cache_dir,
                             batch_size=self.batch_size, output_dir=self.output_dir, offline=self.offline)


def _as_wrapper(model, prompts, batch_size: int) -> Me5MtebEncoder:
    if isinstance(model, Me5MtebEncoder):
        wrapper = model.with_prompts(prompts or model.prompts)  # a copy: the batch size below is this run's
    elif isinstance(model, (str, os.PathLike)):
        wrapper = Me5MtebEncoder.from_pretrained(model, prompts=prompts)
    elif isinstance(model, tuple) and len(model) == 2:
        if prompts is None:
            raise ConfigError("prompts", "an (encoder, tokenizer) pair has no prompt policy of its own: pass prompts=")
        wrapper = Me5MtebEncoder(model[0], model[1], prompts=prompts)
    else:
        raise ConfigError("model", f"need an Me5MtebEncoder, an exported model folder or (encoder, tokenizer), "
                                   f"got {type(model).__name__}")
    wrapper.batch_size = int(batch_size)
    return wrapper


def _load(task: AbsTask, cache_dir) -> None:
    """Load a task's data, turning a dataset missing from the local cache into a :class:`DataError`."""
    if task.data_loaded:
        return
    try:
        task.load_data()
    except Exception as err:  # any load failure is reported with the task and dataset named
        ds = task.metadata.dataset or {}
        where = str(cache_dir) if cache_dir is not None else _datasets_cache()
        dataset = f"'{ds.get('path')}' (revision {ds.get('revision')})"
        if _is_missing(err):
            msg = (f"mteb task '{task.metadata.name}': its dataset {dataset} is not in the local Hugging Face "
                   f"datasets cache ({where}); the evaluation runs offline: load the task once with network access "
                   f"(mteb.get_task('{task.metadata.name}').load_data()) or point cache_dir at a cache that has it")
        else:
            msg = f"mteb task '{task.metadata.name}': cannot load its dataset {dataset} from {where}"
        first = str(err).splitlines()[0] if str(err) else ""
        raise DataError(f"{msg} ({type(err).__name__}: {first})") from err


def _is_missing(err: BaseException) -> bool:
    """Whether a load error (or one it came from) says the data is not there: offline, not cached, not found."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (ConnectionError, FileNotFoundError)) or type(err).__name__ in {
            "OfflineModeIsEnabled", "LocalEntryNotFoundError", "DatasetNotFoundError", "EntryNotFoundError",
        }:
            return True
        err = err.__cause__ or err.__context__
    return False


def _datasets_cache() -> str:
    import datasets

    return str(datasets.config.HF_DATASETS_CACHE)


@contextlib.contextmanager
def _hf_datasets(cache_dir, *, offline: bool) -> Iterator[None]:
    """For a while: ``datasets`` reads from ``cache_dir`` and, when ``offline``, neither it nor the hub client
    goes to the network (their module-level switches are read at import, so they are set here, then restored)."""
    import datasets
    import huggingface_hub

    saved = {
        "cache": datasets.config.HF_DATASETS_CACHE,
        "ds_offline": datasets.config.HF_HUB_OFFLINE,
        "hub_offline": huggingface_hub.constants.HF_HUB_OFFLINE,
        "env": {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")},
    }
    try:
        if cache_dir is not None:
            datasets.config.HF_DATASETS_CACHE = Path(cache_dir).expanduser()
        if offline:
            datasets.config.HF_HUB_OFFLINE = True
            huggingface_hub.constants.HF_HUB_OFFLINE = True
            os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
        yield
    finally:
        datasets.config.HF_DATASETS_CACHE = saved["cache"]
        datasets.config.HF_HUB_OFFLINE = saved["ds_offline"]
        huggingface_hub.constants.HF_HUB_OFFLINE = saved["hub_offline"]
        for k, v in saved["env"].items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

