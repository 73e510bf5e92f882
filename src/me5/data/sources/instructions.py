"""Synthetic instruction data in the JSON shapes of E5-mistral's generation prompts (mE5-large-instruct).

mE5-large-instruct adds ~500k GPT-3.5/4 examples with 150k instructions in 93 languages to its fine-tuning data
(mE5 §2); they were not released. They were made with E5-mistral's two-step recipe (arXiv 2401.00368, §3.1 and
its appendix prompts): brainstorm a task definition, then ask for one example of it as a JSON object whose keys
depend on the task kind. :class:`SyntheticInstructions` reads such examples as generated, one per jsonl line (or
parquet row), and turns each into a pair whose ``instruction`` is its own task definition:

================  ==========================================  ===========  ==========  ==========  =========
kind              generated keys                              query        positive    negative    symmetric
================  ==========================================  ===========  ==========  ==========  =========
retrieval         ``user_query``, ``positive_document``,      user_query   positive_   hard_neg.   no
(short-long)      ``hard_negative_document``                               document
classification    ``input_text``, ``label``,                  input_text   label       misleading  no
(long-short)      ``misleading_label``                                                 _label
matching (short-  ``input``, ``positive_document``            input        positive_   (none)      no
short, long-long)                                                          document
sts, bitext       ``S1``, ``S2``, ``S3``                      S1           S2          S3          yes
================  ==========================================  ===========  ==========  ==========  =========

A line holds the task definition (``task``; also read as ``instruction`` or ``task_definition``), optionally the
kind (``task_type``: one of :data:`KINDS` or E5-mistral's names such as ``short-long``), the language (``lang``,
else E5-mistral's ``language`` name as given), and the generated object: its keys at the top level, or under
``response`` / ``output`` as an object or as the model's raw text (a JSON object, optionally in a Markdown code
fence). The kind follows from the keys; ``S1``/``S2``/``S3`` are STS or bitext by ``task_type``, else by the
definition: a line with neither is an error. STS and bitext examples without a definition get E5-mistral's
fixed ones (``TASKS["sts"]``, ``TASKS["bitext"]``; both sides carry the instruction under the instruct policy,
as unilm's evaluation does for symmetric tasks).

Errors and skips follow :mod:`me5.data.sources.raw`: a missing key or a wrong type is malformed input naming the
field; an empty generated text is skipped and counted (``skipped/empty_<key>``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

from me5.data.sources.raw import RawPairSource, first_key, get_field, get_text, has, nonempty
from me5.errors import DataError
from me5.prompts import TASKS

#: the kinds of example, by the keys E5-mistral's prompts ask for: (query, positive, negative or None, symmetric)
KINDS: dict[str, tuple[str, str, str | None, bool]] = {
    "retrieval": ("user_query", "positive_document", "hard_negative_document", False),
    "classification": ("input_text", "label", "misleading_label", False),
    "matching": ("input", "positive_document", None, False),
    "sts": ("S1", "S2", "S3", True),
    "bitext": ("S1", "S2", "S3", True),
}
#: E5-mistral's names of the task kinds (its prompt families) -> :data:`KINDS`
KIND_ALIASES = {
    "short-long": "retrieval", "long-short": "classification", "short-short": "matching", "long-long": "matching",
    "text_retrieval": "retrieval", "text_classification": "classification", "text_matching": "matching",
    "monolingual_sts": "sts", "bitext_retrieval": "bitext", "bitext_mining": "bitext",
}
#: the query keys, each of which marks a generated object (sts and bitext share S1)
QUERY_KEYS = tuple(dict.fromkeys(query for query, *_ in KINDS.values()))
TASK_FIELDS = ("task", "instruction", "task_definition")
RESPONSE_FIELDS = ("response", "output")
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def kind_of(example: Mapping, task_type: str | None) -> str:
    """The kind of one generated object (:data:`KINDS`), from ``task_type`` when given, else from its keys."""
    if task_type is not None:
        kind = KIND_ALIASES.get(task_type.strip().lower(), task_type.strip().lower())
        if kind not in KINDS:
            raise DataError(f"unknown task_type '{task_type}'; known: {sorted(KINDS) + sorted(KIND_ALIASES)}",
                            field="task_type")
        return kind
    key = next((k for k in QUERY_KEYS if has(example, k)), None)
    if key == "S1":
        return "sts/bitext"  # told apart by the definition (see the module docstring)
    if key is not None:
        return next(kind for kind, (query, *_) in KINDS.items() if query == key)
    raise DataError(f"no generated example: expected the keys of one of {sorted(KINDS)} (user_query, input_text, "
                    f"input or S1), got {sorted(example)}", field="user_query")


def parse_response(value) -> Mapping:
    """A generated object: an object as is, or the model's raw text parsed (one JSON object, maybe fenced)."""
    if isinstance(value, Mapping):
        return value
    if not isinstance(value, str):
        raise DataError(f"expected an object or the model's JSON text, got {type(value).__name__}", field="response")
    text = value.strip()
    m = _FENCE.match(text)
    try:
        parsed = json.loads(m.group(1) if m else text)
    except (ValueError, RecursionError) as err:
        raise DataError(f"the generated text is not JSON ({str(err)[:80]})", field="response") from None
    if not isinstance(parsed, Mapping):
        raise DataError(f"the generated text is JSON {type(parsed).__name__}, not an object", field="response")
    return parsed


class SyntheticInstructions(RawPairSource):
    """E5-mistral-style synthetic examples, each with its own task definition (see the module docstring).

    Raw: jsonl(.gz) or parquet files of generated examples (none were published; ``default_path`` is where
    ``me5.prepare`` expects them). Language: the record's ``lang``, else its ``language`` as E5-mistral names it.
    """

    source_name = "synthetic_instructions"
    default_path = "./data/synthetic/instructions.jsonl"
    task = "generic"  # only for a line without a definition of a kind that has no fixed one: an error first

    def pair(self, record: Mapping) -> Mapping:
        example = record
        if not any(has(record, k) for k in QUERY_KEYS):
            example = parse_response(record[first_key(record, RESPONSE_FIELDS)])
        task_type = get_field(record, "task_type") if has(record, "task_type") else None
        instruction = None
        if any(has(record, k) for k in TASK_FIELDS):
            key = first_key(record, TASK_FIELDS)
            instruction = nonempty(get_field(record, key), key)
        kind = kind_of(example, task_type)
        if kind == "sts/bitext":
            if instruction is None:
                raise DataError("an S1/S2/S3 example needs a task_type (sts or bitext) or a task definition",
                                field="task_type")
            kind = "bitext" if instruction == TASKS["bitext"] else "sts"
        query_key, positive_key, negative_key, symmetric = KINDS[kind]
        if instruction is None:
            if kind not in ("sts", "bitext"):
                raise DataError(f"a {kind} example needs its task definition", field=TASK_FIELDS[0])
            instruction = TASKS[kind]
        out = {"query": get_text(example, query_key), "positive": get_text(example, positive_key),
               "instruction": instruction, "symmetric": symmetric}
        if negative_key is not None and example.get(negative_key) is not None:
            out["negatives"] = [get_text(example, negative_key)]
        return out
