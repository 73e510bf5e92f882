"""Every prompt me5 puts in front of a text: one policy object, and the task instructions it may use.

mE5 models read their input with a prompt, and a model must be used with the prompts it was trained with.
Three policies exist (:data:`STYLES`):

* ``e5`` (mE5-small/base/large, mE5 model card and unilm ``mteb_beir_eval.py``): queries ``query: ``, documents
  ``passage: ``; **symmetric** tasks (NLI, paraphrase, bitext, STS; Quora duplicates in retrieval) put
  ``query: `` on both sides.
* ``instruct`` (mE5-large-instruct, E5-mistral's template, unilm ``utils.py`` ``get_detailed_instruct``): queries
  ``Instruct: {task}\\nQuery: ``, documents nothing (not even ``passage: ``, unilm ``mteb_beir_eval.py``);
  symmetric tasks put the instruction on every input (unilm ``mteb_except_retrieval_eval.py``).
* ``none``: no prompt at all (for ablations and models trained without prefixes).

Every consumer takes its strings from a :class:`PromptPolicy`: the training collator (through the DataModule),
the retrieval evaluators, the export (sentence-transformers ``prompts``), ``python -m me5.evaluate`` and the
consistency filter of ``me5.mining``. The task definitions of the instruct policy are in :data:`TASKS`, keyed by
name; a data source names its task there (``Source.task``) and may override it with its own ``instruction``.
"""

from __future__ import annotations

from collections.abc import Mapping

from me5.errors import ConfigError

STYLES = ("e5", "instruct", "none")
E5_QUERY = "query: "
E5_DOCUMENT = "passage: "
INSTRUCT_TEMPLATE = "Instruct: {task}\nQuery: "

WIKI_QA = "Retrieve Wikipedia passages that answer the question"
WIKI_QUESTION = "Given a question, retrieve Wikipedia passages that answer the question"

#: task name -> task definition (the ``{task}`` of :data:`INSTRUCT_TEMPLATE`). Retrieval and symmetric-task
#: definitions are E5-mistral's (arXiv 2401.00368, Table 13) as unilm ``e5/utils.py`` spells them; the stage-1
#: definitions (weak pairs have no published instruction [U]) describe each pair the way those do.
TASKS: dict[str, str] = {
    # generic and evaluation tasks
    "retrieval": "Given a web search query, retrieve relevant passages that answer the query",
    "generic": "Given a query, retrieve relevant passages",
    "miracl": WIKI_QUESTION,
    "sts": "Retrieve semantically similar text.",
    "bitext": "Retrieve parallel sentences.",
    # stage 1 (mE5 Table 1)
    "wikipedia": "Given a Wikipedia section title, retrieve the passage of that section",
    "mc4": "Given the title of a web page, retrieve the content of that page",
    "cc_news": "Given a news headline, retrieve the news article",
    "nllb": "Retrieve parallel sentences.",
    "reddit": "Given a Reddit comment, retrieve a reply to it",
    "s2orc": "Given the title of a scientific paper, retrieve the abstract of that paper",
    "s2orc_title_citation": "Given the title of a scientific paper, retrieve the titles of papers it cites",
    "s2orc_abstract_citation": "Given the abstract of a scientific paper, retrieve the abstracts of papers it cites",
    "stackexchange": "Given a question from a Stack Exchange site, retrieve the most upvoted answer",
    "xp3": "Given an instruction or question, retrieve the response to it",
    "sbert": "Given a text, retrieve a text that is semantically related to it",
    # stage 2 (mE5 Table 2)
    "msmarco_passage": "Given a web search query, retrieve relevant passages that answer the query",
    "msmarco_document": "Given a web search query, retrieve relevant documents that answer the query",
    "nq": WIKI_QUESTION,
    "triviaqa": WIKI_QA,
    "squad": WIKI_QA,
    "nli": "Retrieve semantically similar text.",
    "eli5": "Provided a user question, retrieve the highest voted answers on Reddit ELI5 forum",
    "dureader": "Given a Chinese search query, retrieve web passages that answer the question",
    "fever": "Given a claim, retrieve documents that support or refute the claim",
    "hotpotqa": "Given a multi-hop question, retrieve documents that can help answer the question",
    "quora": "Given a question, retrieve questions that are semantically equivalent to the given question",
    "mrtydi": WIKI_QUESTION,
}


def task_instruction(task: str) -> str:
    """The definition of the task named ``task`` (:data:`TASKS`); an unknown name is a :class:`ConfigError`."""
    if task not in TASKS:
        raise ConfigError("task", f"unknown task '{task}'; known tasks: {sorted(TASKS)}")
    return TASKS[task]


class PromptPolicy:
    """The prompts of one model (see the module docstring).

    Args:
        style: ``e5``, ``instruct`` or ``none``.

    ``instruction`` arguments are task definitions (``TASKS[...]`` or a source's own); they matter only to the
    instruct style, which needs one. (A plain class, not a dataclass: Hydra would turn a dataclass handed to
    ``instantiate`` as a keyword into a config node.)
    """

    __slots__ = ("style",)

    def __init__(self, style: str = "e5"):
        if style not in STYLES:
            raise ConfigError("prompts.style", f"unknown prompt style '{style}'; choose one of {list(STYLES)}")
        self.style = style

    def __repr__(self) -> str:
        return f"PromptPolicy({self.style!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, PromptPolicy) and other.style == self.style

    def __hash__(self) -> int:
        return hash(self.style)

    def _instruct(self, instruction: str | None) -> str:
        if not instruction:
            raise ConfigError("prompts.style", "the instruct prompt style needs a task instruction")
        return INSTRUCT_TEMPLATE.format(task=instruction)

    def query(self, instruction: str | None = None) -> str:
        """The prompt of a query (of either side of a symmetric task)."""
        if self.style == "e5":
            return E5_QUERY
        if self.style == "instruct":
            return self._instruct(instruction)
        return ""

    def document(self, instruction: str | None = None, *, symmetric: bool = False) -> str:
        """The prompt of a document (passage); a symmetric task's other side gets the query prompt."""
        if symmetric:
            return self.query(instruction)
        return E5_DOCUMENT if self.style == "e5" else ""

    def pair(self, instruction: str | None = None, *, symmetric: bool = False) -> tuple[str, str]:
        """``(query prompt, document prompt)`` of a task."""
        return self.query(instruction), self.document(instruction, symmetric=symmetric)

    def sentence_transformers(self, instruction: str | None = None) -> dict:
        """The ``prompts`` and ``default_prompt_name`` of an exported sentence-transformers config.

        ``encode(texts, prompt_name="query")`` / ``"passage"`` / ``"document"`` give the retrieval prompts of
        ``instruction`` (instruct style; the generic web-search task when ``None``). The default prompt is the
        query prompt: the mE5 model cards ask for ``query: `` on any text that is not a retrieval document
        (symmetric tasks, features), and the instruct card for the instruction on every such input.
        """
        if self.style == "instruct" and instruction is None:
            instruction = TASKS["retrieval"]
        q, d = self.pair(instruction)
        prompts = {"query": q, "passage": d, "document": d}
        return {"prompts": prompts, "default_prompt_name": "query" if q else None}

    def to_dict(self) -> dict:
        return {"style": self.style}

    @classmethod
    def from_dict(cls, d: Mapping) -> PromptPolicy:
        return cls(style=str(d.get("style", "e5")))

    @classmethod
    def infer(cls, query_prompt: str, document_prompt: str) -> PromptPolicy:
        """The policy that writes these retrieval prompts (a sentence-transformers folder's ``prompts``)."""
        if query_prompt == E5_QUERY and document_prompt == E5_DOCUMENT:
            return cls("e5")
        if query_prompt.startswith("Instruct: ") and query_prompt.endswith("\nQuery: ") and document_prompt == "":
            return cls("instruct")
        if not query_prompt and not document_prompt:
            return cls("none")
        raise ConfigError("prompts", f"the prompts {query_prompt!r} / {document_prompt!r} match no prompt style "
                                     f"of {list(STYLES)}")


def prompt_token_count(tokenizer, prompt: str) -> int:
    """How many leading tokens ``prompt`` takes in ``prompt + text``: its own encoding with special tokens, less a
    closing special token (``</s>``); 0 for no prompt. The rule of sentence-transformers'
    ``Transformer._get_prompt_length``, so a ``Pooling(include_prompt=False)`` export pools the same tokens.
    """
    if not prompt:
        return 0
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return len(ids) - 1 if ids and ids[-1] in set(tokenizer.all_special_ids) else len(ids)
