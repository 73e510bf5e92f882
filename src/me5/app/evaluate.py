"""Evaluate a saved encoder on a BEIR / MIRACL-layout folder.

    python -m me5.evaluate --model outputs/finetune/model --data data/sample/eval --output metrics.json

Pooling, normalisation and the prompt policy come from the model folder's ``me5.json`` (written by
:func:`me5.export.export_encoder`), else from its sentence-transformers files (the policy whose prompts they
hold), else the mE5 defaults (mean pooling, unit vectors, the E5 policy); ``--prompts`` overrides the policy and
``--task`` names the task whose instruction the instruct policy uses (``me5.prompts.TASKS``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from me5.errors import ConfigError, Me5Error
from me5.prompts import STYLES, TASKS, PromptPolicy

log = logging.getLogger("me5.evaluate")

DEFAULTS = {"pooling": "mean", "normalize": True, "prompts": "e5"}
_FROM_ST_POOLING = {"mean": "mean", "cls": "cls", "lasttoken": "last"}
_ST_FLAG_POOLING = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "last",
}


def read_model_settings(model: str) -> dict[str, Any]:
    """Pooling / normalize / prompt style of a saved model: ``me5.json``, else sentence-transformers files, else
    defaults."""
    settings = dict(DEFAULTS)
    me5_cfg = _read_json(model, "me5.json")
    if me5_cfg is not None:
        settings.update({k: me5_cfg[k] for k in ("pooling", "normalize") if k in me5_cfg})
        if "prompts" in me5_cfg:
            settings["prompts"] = PromptPolicy.from_dict(me5_cfg["prompts"]).style
        elif "query_prefix" in me5_cfg:  # folders exported before the prompt policy existed
            settings["prompts"] = PromptPolicy.infer(me5_cfg["query_prefix"], me5_cfg.get("passage_prefix", "")).style
        return settings
    modules = _read_json(model, "modules.json")
    if modules is None:
        return settings
    types = {m.get("type", "").rsplit(".", 1)[-1]: m.get("path", "") for m in modules}
    settings["normalize"] = "Normalize" in types
    if "Pooling" in types:
        pooling_cfg = _read_json(model, f"{types['Pooling']}/config.json") or {}
        settings["pooling"] = _pooling_from_st(pooling_cfg, model)
    prompts = (_read_json(model, "config_sentence_transformers.json") or {}).get("prompts") or {}
    if "query" in prompts:
        doc = next((prompts[n] for n in ("passage", "document") if n in prompts), "")
        settings["prompts"] = PromptPolicy.infer(prompts["query"], doc).style
    return settings


def _pooling_from_st(cfg: dict, model: str) -> str:
    mode = cfg.get("pooling_mode")
    if mode is None:
        modes = [name for flag, name in _ST_FLAG_POOLING.items() if cfg.get(flag)]
        other = [
            k for k, v in cfg.items() if k.startswith("pooling_mode_") and v and k not in _ST_FLAG_POOLING
        ]
        if other or len(modes) > 1:
            raise ConfigError(
                "--model", f"{model}: sentence-transformers pooling {other + modes} is not supported"
            )
        return modes[0] if modes else "mean"
    if isinstance(mode, list) and len(mode) == 1:
        mode = mode[0]
    if mode not in _FROM_ST_POOLING:
        raise ConfigError("--model", f"{model}: sentence-transformers pooling '{mode}' is not supported")
    return _FROM_ST_POOLING[mode]


def _read_json(model: str, filename: str) -> Any | None:
    """A json file of a local model folder or a (cached) hub repo; ``None`` when absent."""
    path = Path(model) / filename
    if Path(model).is_dir():
        if not path.is_file():
            return None
    else:
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(model, filename))
        except Exception:  # not on the hub, offline, or no such file: fall back to the next source
            return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError("--model", f"{path}: malformed JSON ({err.msg} at line {err.lineno})") from err


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m me5.evaluate``."""
    p = argparse.ArgumentParser(prog="me5-evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="exported model folder or hub id")
    p.add_argument(
        "--data", required=True, help="BEIR folder, or folder of per-language BEIR folders (MIRACL)"
    )
    p.add_argument("--split", default="test", help="qrels/{split}.tsv (default: test)")
    p.add_argument("--name", default=None, help="metric key prefix (default: the data folder's name)")
    p.add_argument("--output", default=None, help="write metrics to this json file")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--query-max-length", type=int, default=64)
    p.add_argument("--passage-max-length", type=int, default=128)
    p.add_argument("--prompts", default=None, choices=STYLES, help="override the saved prompt policy")
    p.add_argument("--task", default="generic", choices=sorted(TASKS),
                   help="the task whose instruction the instruct policy puts on queries (default: generic)")
    p.add_argument("--languages", nargs="+", default=None, help="evaluate only these languages")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    return p


def run(args: argparse.Namespace) -> dict[str, float]:
    """Load the model and data named by ``args``, evaluate, print the table and write ``--output``."""
    import torch

    from me5.eval.retrieval import RetrievalEvaluator, format_table, load_beir
    from me5.models.encoder import Encoder
    from me5.models.tokenizer import load_tokenizer

    data = load_beir(args.data, split=args.split)  # data errors before the (slow) model load
    settings = read_model_settings(args.model)
    if args.prompts is not None:
        settings["prompts"] = args.prompts
    settings["task"] = args.task
    tokenizer = load_tokenizer(args.model)
    encoder = Encoder.from_pretrained(
        args.model, pooling=settings["pooling"], normalize=settings["normalize"], tokenizer=tokenizer
    )
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    encoder.to(device)
    name = args.name or Path(args.data).resolve().name
    evaluator = RetrievalEvaluator(
        data,
        name=name,
        prompts=PromptPolicy(settings["prompts"]),
        task=args.task,
        query_max_length=args.query_max_length,
        passage_max_length=args.passage_max_length,
        batch_size=args.batch_size,
        languages=args.languages,
    )
    metrics = evaluator.evaluate(encoder, tokenizer, device=device, show_progress=sys.stderr.isatty())
    print(format_table({Path(args.model).name or args.model: metrics}))
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "model": args.model,
            "data": args.data,
            "split": args.split,
            "settings": settings,
            "metrics": metrics,
        }
        out.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        log.info("wrote %s", out)
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 with the message on bad data or config, no traceback, as
    ``me5.train`` and ``me5.prepare``)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run(args)
    except Me5Error as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
