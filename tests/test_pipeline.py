"""``me5.app.pipeline``: a stage started from an exported folder keeps every ``model.encoder`` setting."""

from __future__ import annotations

import inspect

import pytest
from omegaconf import OmegaConf

from me5.app.pipeline import build_encoder, encoder_settings
from me5.export import export_encoder
from me5.models.encoder import Encoder
from me5.prompts import PromptPolicy
from tests import tiny
from tests.helpers import compose_cfg, group_options

# the folder loader's keywords that are not settings: the folder and the (checked) tokenizer
NOT_SETTINGS = {"name_or_path", "tokenizer"}


def _loader_keywords() -> set[str]:
    return set(inspect.signature(Encoder.from_pretrained).parameters) - {"cls"} - NOT_SETTINGS


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny encoder exported with the default settings (mean pooling, normalised, prompt included, fp32)."""
    tok = tiny.tokenizer()
    enc = Encoder.from_scratch(tokenizer=tok, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64)
    folder = tmp_path_factory.mktemp("export") / "pretrain"
    export_encoder(enc, tok, folder, prompts=PromptPolicy("e5"))
    return folder, tok


def test_a_stage_from_an_export_keeps_every_encoder_setting(export):
    """Every setting differs from the export's and the loader's defaults; each reaches the encoder."""
    folder, tok = export
    factory = OmegaConf.create({
        "_target_": "me5.models.encoder.Encoder.from_scratch", "_partial_": True, "model_type": "xlm-roberta",
        "num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
        "pooling": "mean", "include_prompt": False, "normalize": False, "autocast": "bf16",
        "attn_implementation": "eager", "gradient_checkpointing": True, "packed": False,
        "packed_attention_dropout": "off",
    })
    assert set(encoder_settings(factory)) == _loader_keywords()  # all of them, whatever the loader adds later
    enc = build_encoder(factory, tok, init_from=str(folder))
    assert (enc.include_prompt, enc.normalize, enc.autocast, enc.pooling) == (False, False, "bf16", "mean")
    assert enc.packed_attention_dropout == "off"
    assert enc.backbone.config._attn_implementation == "eager"
    assert enc.backbone.is_gradient_checkpointing
    # cls pooling too (the other branch of include_prompt's check)
    enc = build_encoder(OmegaConf.merge(factory, {"pooling": "cls", "include_prompt": True}), tok, init_from=str(folder))
    assert enc.pooling == "cls" and enc.autocast == "bf16"


@pytest.mark.parametrize("option", group_options("model"))
def test_every_model_configs_settings_reach_the_folder_loader(option, tmp_path):
    """What each ``model`` option sets besides the backbone's shape is a keyword of the folder loader (a setting
    the loader does not know would be lost when a stage starts from an export)."""
    cfg = compose_cfg([f"model={option}"], tmp_path=tmp_path)
    node = cfg.model.encoder
    settings = encoder_settings(node)
    assert {"pooling", "normalize", "include_prompt"} <= set(settings)
    target = node._target_.rsplit(".", 1)[1]
    factory = getattr(Encoder, target)
    shape = set(node) - set(settings) - {"_target_", "_partial_"}
    if target == "from_pretrained":
        assert shape == {"name_or_path"}
    else:  # from_scratch: the rest is the backbone's config (num_hidden_layers, hidden_size, ...)
        assert not shape & set(inspect.signature(factory).parameters) - {"model_type"}
