"""The bi-encoder: a Hugging Face backbone, a pooler and L2 normalisation.

One shared encoder embeds queries and passages (mE5, E5); the two sides differ only in their text prefix
(``query: `` / ``passage: ``) and their maximum length, which the data collator applies.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from me5.errors import ConfigError
from me5.models.packing import PackedBatch, pack_padded, position_offset
from me5.models.pooling import POOLER_MODEL_TYPES, POOLERS, mean_pool, without_prompt

log = logging.getLogger(__name__)

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
_POOLER_KEY = re.compile(r"(^|\.)pooler\.dense\.(weight|bias)$")
PACKED_ATTENTION_DROPOUT = ("keep", "off")
# model types whose position ids start after the padding index (usable length = max_position_embeddings - pad - 1)
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "xlm-roberta-xl"}
_FALLBACK_MAX_LENGTH = 512  # neither the tokenizer nor the config says


def flash_attention_available() -> bool:
    """True when FlashAttention-2 can run here: the ``flash-attn`` package and a CUDA device."""
    if not torch.cuda.is_available():
        return False
    try:
        from transformers.utils import is_flash_attn_2_available
    except ImportError:  # pragma: no cover
        return False
    return bool(is_flash_attn_2_available())


def resolve_attn_implementation(name: str, *, packed: bool = False) -> str:
    """The ``attn_implementation`` to hand to transformers.

    ``packed``: the encoder runs packed rows with its own varlen attention (:mod:`me5.models.attention`, which
    uses flash-attn's kernel where installed); the backbone is loaded with ``sdpa`` (its attention for padded
    inputs), and only ``sdpa`` or ``auto`` may be asked for.

    ``auto``: ``flash_attention_2`` when :func:`flash_attention_available` (its varlen kernel skips the
    padding: HF unpads the batch by the attention mask), else ``sdpa`` (PyTorch's fused attention; the
    default). ``flash_attention_2`` without the package or a GPU is a ConfigError, not a late ImportError.
    """
    if name not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(
            "model.encoder.attn_implementation", f"unknown '{name}'; choose one of {list(ATTN_IMPLEMENTATIONS)}"
        )
    if packed:
        if name not in ("auto", "sdpa"):
            raise _packed_attention_error(name)
        return "sdpa"
    if name == "auto":
        return "flash_attention_2" if flash_attention_available() else "sdpa"
    if name == "flash_attention_2" and not flash_attention_available():
        raise ConfigError(
            "model.encoder.attn_implementation",
            "flash_attention_2 needs a CUDA GPU and the flash-attn package (pip install flash-attn "
            "--no-build-isolation); use sdpa (the default) or auto",
        )
    return name


def _packed_attention_error(name) -> ConfigError:
    return ConfigError("model.encoder.attn_implementation",
                       f"packed=true runs its own varlen attention (flash-attn's kernel where installed); "
                       f"attn_implementation applies to padded inputs only and must be sdpa or auto, not '{name}'")


class Encoder(nn.Module):
    """Embeds tokenised text into unit vectors.

    Args:
        backbone: any ``transformers`` model whose output has ``last_hidden_state`` (B, T, D).
        pooling: ``mean`` (mE5), ``cls`` or ``last``.
        normalize: L2-normalise the pooled vector (mE5 scores are cosines).
        autocast: ``bf16``, ``fp16`` or ``fp32``: the dtype of the forward pass under ``torch.autocast``.
            Weights stay in fp32; Lightning's ``precision`` setting is the usual way to pick this, and this
            field covers inference outside a Trainer.
        include_prompt: mean-pool over the prompt's tokens too (mE5 does: unilm pools every non-pad token).
            ``False`` leaves them out (GritLM; sentence-transformers' ``Pooling(include_prompt=False)``): the
            forward then takes each row's ``prompt_length`` (:func:`~me5.prompts.prompt_token_count`).
        packed: run padding-free (:mod:`me5.models.packing`): every forward packs its rows into one flat stream
            (whole rows, per-row position ids, ``cu_seqlens``) and attention stays inside each row
            (:mod:`me5.models.attention`; varlen FlashAttention on CUDA, an exact padded SDPA elsewhere). Padded
            ``(input_ids, attention_mask)`` inputs are packed on the way in; a :class:`PackedBatch` is taken as is.
            Same embeddings as the padded forward (tested); the weights and the export are unchanged.
        packed_attention_dropout: ``keep`` (the default) applies the backbone's attention-probability dropout in
            packed calls too (flash-attn's or PyTorch's own FlashAttention varlen kernel with ``dropout_p`` on
            CUDA); ``off`` drops it there (``torch.nn.attention.varlen.varlen_attn`` has none), leaving hidden
            dropout as it is -- a change of the recipe, logged when the config's rate is not 0.
    """

    def __init__(self, backbone: nn.Module, *, pooling: str = "mean", normalize: bool = True, autocast: str = "fp32",
                 include_prompt: bool = True, packed: bool = False, packed_attention_dropout: str = "keep"):
        super().__init__()
        if pooling not in POOLERS:
            raise ConfigError("model.encoder.pooling", f"unknown pooling '{pooling}'; choose one of {sorted(POOLERS)}")
        if not include_prompt and pooling != "mean":
            raise ConfigError("model.encoder.include_prompt",
                              f"leaving the prompt out of pooling needs mean pooling, not '{pooling}'")
        if autocast not in _AUTOCAST_DTYPES:
            raise ConfigError("model.encoder.autocast", f"unknown '{autocast}'; choose one of {sorted(_AUTOCAST_DTYPES)}")
        self.backbone = backbone
        self.pooling = pooling
        self.normalize = normalize
        self.autocast = autocast
        self.include_prompt = bool(include_prompt)
        if packed_attention_dropout not in PACKED_ATTENTION_DROPOUT:
            raise ConfigError("model.encoder.packed_attention_dropout",
                              f"unknown '{packed_attention_dropout}'; choose one of {list(PACKED_ATTENTION_DROPOUT)}")
        self.packed = bool(packed)
        self.packed_attention_dropout = packed_attention_dropout
        self.first_position = 0  # the position id of a row's first token in packed streams (packing.position_offset)
        if self.packed:
            self._use_packed_attention()
        # The checkpoint's pooler head (``pooler.dense.weight``/``.bias`` on the CPU) when from_pretrained found one,
        # else None. A plain attribute, not a module or parameter: DDP, optimisers and Lightning checkpoints never
        # see it; only the export writes it back (``export_encoder``), so that ``AutoModel`` finds every weight.
        self.pooler_state: dict[str, Tensor] | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        pooling: str = "mean",
        normalize: bool = True,
        include_prompt: bool = True,
        autocast: str = "fp32",
        attn_implementation: str = "sdpa",
        gradient_checkpointing: bool = False,
        packed: bool = False,
        packed_attention_dropout: str = "keep",
        tokenizer=None,
    ) -> Encoder:
        """Load a backbone by hub id (``FacebookAI/xlm-roberta-base``) or local folder, without a pooler head.

        ``tokenizer`` is optional and only checked: a tokenizer larger than the embedding table is an error.

        Pooler head (bert, roberta, xlm-roberta): the backbone never has one (unused pooler parameters break DDP
        without ``find_unused_parameters``). When the checkpoint holds pooler weights (an mE5 checkpoint, a me5
        export), they are loaded with the model -- so transformers reports no unused keys -- then moved to
        :attr:`pooler_state` and the module dropped; the export writes them back. A checkpoint without them
        (``xlm-roberta-base``, an MLM checkpoint) is loaded with ``add_pooling_layer=False``, so transformers
        reports no freshly initialised pooler either.
        """
        from transformers import AutoConfig, AutoModel

        try:
            config = AutoConfig.from_pretrained(name_or_path)
        except OSError as err:
            raise ConfigError(
                "model.name_or_path",
                f"cannot load '{name_or_path}': not a local folder with config.json, and the hub is unreachable "
                f"or has no such model ({err.__class__.__name__}: {str(err).splitlines()[0]})",
            ) from err
        kwargs = {"attn_implementation": resolve_attn_implementation(attn_implementation, packed=packed)}
        has_pooler = config.model_type in POOLER_MODEL_TYPES and _checkpoint_has_pooler(name_or_path)
        if config.model_type in POOLER_MODEL_TYPES:
            kwargs["add_pooling_layer"] = has_pooler
        backbone, info = AutoModel.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
        pooler_state = None
        if getattr(backbone, "pooler", None) is not None and has_pooler:
            if not any(_POOLER_KEY.search(k) for k in info["missing_keys"]):  # loaded, not freshly initialised
                pooler_state = {
                    f"pooler.{k}": v.detach().cpu().clone() for k, v in backbone.pooler.state_dict().items()
                }
            backbone.pooler = None  # the forward skips a None pooler; no unused parameters for DDP
        _check_vocab(backbone, tokenizer)
        enc = cls(backbone, pooling=pooling, normalize=normalize, autocast=autocast, include_prompt=include_prompt,
                  packed=packed, packed_attention_dropout=packed_attention_dropout)
        enc.pooler_state = pooler_state
        if gradient_checkpointing:
            enc.enable_activation_checkpointing()
        return enc

    @classmethod
    def from_scratch(
        cls,
        *,
        tokenizer,
        model_type: str = "xlm-roberta",
        pooling: str = "mean",
        normalize: bool = True,
        include_prompt: bool = True,
        autocast: str = "fp32",
        attn_implementation: str = "sdpa",
        gradient_checkpointing: bool = False,
        packed: bool = False,
        packed_attention_dropout: str = "keep",
        **config_kwargs,
    ) -> Encoder:
        """Build a randomly initialised backbone from a config (the ``tiny`` model), sized to ``tokenizer``."""
        config = dict(
            model_type=model_type,
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id,
            eos_token_id=tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id,
            **config_kwargs,
        )
        return cls.from_config(
            config, pooling=pooling, normalize=normalize, autocast=autocast, include_prompt=include_prompt,
            attn_implementation=attn_implementation, gradient_checkpointing=gradient_checkpointing,
            packed=packed, packed_attention_dropout=packed_attention_dropout,
        )

    @classmethod
    def from_config(
        cls,
        config,
        *,
        pooling: str = "mean",
        normalize: bool = True,
        include_prompt: bool = True,
        autocast: str = "fp32",
        attn_implementation: str = "sdpa",
        gradient_checkpointing: bool = False,
        packed: bool = False,
        packed_attention_dropout: str = "keep",
    ) -> Encoder:
        """A randomly initialised backbone of any shape, no download and no tokenizer.

        ``config``: a ``transformers`` config, or a dict with ``model_type`` and the config fields (e.g. the
        real XLM-R-large dimensions for a benchmark, :mod:`benchmarks.train_step`).
        """
        from transformers import AutoConfig, AutoModel

        if isinstance(config, dict):
            fields = dict(config)
            config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        kwargs = {"add_pooling_layer": False} if config.model_type in POOLER_MODEL_TYPES else {}
        backbone = AutoModel.from_config(
            config, attn_implementation=resolve_attn_implementation(attn_implementation, packed=packed), **kwargs
        )
        enc = cls(backbone, pooling=pooling, normalize=normalize, autocast=autocast, include_prompt=include_prompt,
                  packed=packed, packed_attention_dropout=packed_attention_dropout)
        if gradient_checkpointing:
            enc.enable_activation_checkpointing()
        return enc

    def enable_activation_checkpointing(self) -> None:
        """Recompute each layer's activations in backward (for ``large``); trades ~30% compute for memory."""
        fn = getattr(self.backbone, "gradient_checkpointing_enable", None)
        if fn is None:
            raise ConfigError("model.encoder.gradient_checkpointing", f"{type(self.backbone).__name__} does not support it")
        fn(gradient_checkpointing_kwargs={"use_reentrant": False})

    def _use_packed_attention(self) -> None:
        """Switch the backbone to the attention that reads ``cu_seqlens`` (me5.models.attention)."""
        from me5.models import attention

        config = self.backbone.config
        self.first_position = position_offset(config)
        current = getattr(config, "_attn_implementation", None)
        if current not in (None, "sdpa", *attention.PACKED_IMPLEMENTATIONS):
            raise _packed_attention_error(current)
        attention.register()
        name = attention.VARLEN if self.packed_attention_dropout == "keep" else attention.VARLEN_NODROP
        self.backbone.set_attn_implementation(name)
        if config._attn_implementation != name:  # pragma: no cover - a transformers that refused it
            raise ConfigError("model.encoder.packed", f"{type(self.backbone).__name__} does not take the attention "
                              f"implementation '{name}' (it must use transformers' AttentionInterface)")
        rate = float(getattr(config, "attention_probs_dropout_prob", 0.0) or 0.0)
        if self.packed_attention_dropout == "off" and rate > 0:
            log.warning("packed rows: attention-probability dropout OFF (the backbone config says %g; "
                        "model.encoder.packed_attention_dropout=off); hidden dropout unchanged", rate)
        else:
            log.info("packed rows: attention-probability dropout %g (packed_attention_dropout=%s)", rate,
                     self.packed_attention_dropout)

    # ------------------------------------------------------------------ forward
    @property
    def dim(self) -> int:
        return int(self.backbone.config.hidden_size)

    def forward(self, input_ids: Tensor | PackedBatch, attention_mask: Tensor | None = None,
                prompt_length: Tensor | int | None = None) -> Tensor:
        """(B, T) token ids and mask -> (B, D) embeddings (unit norm when ``normalize``).

        ``prompt_length``: the number of leading real tokens of each row (an int, or (B,)) that belong to the
        prompt, ``<s>`` included; pooling leaves them out when ``include_prompt`` is False (else it is ignored).
        A :class:`~me5.models.packing.PackedBatch` (N rows; its own ``prompt_length``) -> (N, D), on a ``packed``
        encoder only; a packed encoder packs padded inputs itself.
        """
        if isinstance(input_ids, PackedBatch) or self.packed:
            if not self.packed:
                raise ConfigError("model.encoder.packed", "a PackedBatch needs an encoder built with packed=true: the "
                                  "backbone's attention would otherwise attend across the rows of the flat stream")
            if not isinstance(input_ids, PackedBatch):
                input_ids = pack_padded(input_ids, attention_mask, offset=self.first_position,
                                        prompt_length=prompt_length)
            return self._forward_packed(input_ids)
        dtype = _AUTOCAST_DTYPES[self.autocast]
        ctx = (
            torch.autocast(device_type=input_ids.device.type, dtype=dtype)
            if dtype is not None
            else contextlib.nullcontext()
        )
        with ctx:
            hidden_BTD = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            pool_mask = attention_mask
            if prompt_length is not None and not self.include_prompt:
                pool_mask = without_prompt(attention_mask, prompt_length)
            pooled_BD = POOLERS[self.pooling](hidden_BTD, pool_mask)
        pooled_BD = pooled_BD.float()
        return F.normalize(pooled_BD, dim=-1) if self.normalize else pooled_BD

    def _forward_packed(self, batch: PackedBatch) -> Tensor:
        """One flat stream through the backbone (attention inside each row), pooled per row -> (N, D)."""
        from me5.models.attention import PACKED_IMPLEMENTATIONS

        impl = self.backbone.config._attn_implementation
        if impl not in PACKED_IMPLEMENTATIONS:  # e.g. switched back to sdpa after construction
            raise ConfigError("model.encoder.attn_implementation",
                              f"the backbone's attention is '{impl}', which ignores cu_seqlens: a packed stream would "
                              f"attend across its rows; packed inputs need one of {list(PACKED_IMPLEMENTATIONS)}")
        dtype = _AUTOCAST_DTYPES[self.autocast]
        ctx = (torch.autocast(device_type=batch.device.type, dtype=dtype) if dtype is not None
               else contextlib.nullcontext())
        rows = {"cu_seq_lens_q": batch.cu_seqlens, "cu_seq_lens_k": batch.cu_seqlens,
                "max_length_q": batch.max_length, "max_length_k": batch.max_length}
        with ctx:
            hidden_TD = self.backbone(input_ids=batch.input_ids.unsqueeze(0), position_ids=batch.position_ids.unsqueeze(0),
                                      **rows).last_hidden_state[0]
            if self.pooling == "cls":
                pooled_ND = hidden_TD.index_select(0, batch.cu_seqlens[:-1].long())
            elif self.pooling == "last":
                pooled_ND = hidden_TD.index_select(0, batch.cu_seqlens[1:].long() - 1)
            else:  # mean over each row's tokens (its prompt left out when include_prompt is False)
                mask_NL = batch.padded_mask()
                if batch.prompt_length is not None and not self.include_prompt:
                    mask_NL = without_prompt(mask_NL, batch.prompt_length)
                pooled_ND = mean_pool(batch.repad(hidden_TD), mask_NL)
        pooled_ND = pooled_ND.float()
        return F.normalize(pooled_ND, dim=-1) if self.normalize else pooled_ND


def model_max_length(config, tokenizer) -> int:
    """The model's own input limit: min(``tokenizer.model_max_length`` when set, the usable positions).

    512 for the XLM-R family (514 position embeddings less the padding offset). A tokenizer without a limit
    has ``model_max_length`` ~1e30; with no limit from either side, 512.
    """
    limits = [position_limit(config)]
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < 1_000_000:
        limits.append(tok_limit)
    limits = [n for n in limits if n is not None]
    return min(limits) if limits else _FALLBACK_MAX_LENGTH


def position_limit(config) -> int | None:
    """How many tokens the position embeddings take (None: no absolute positions in the config)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None:
        return None
    if config.model_type in _OFFSET_POSITIONS:
        limit -= (config.pad_token_id or 0) + 1
    return int(limit)


def _checkpoint_has_pooler(name_or_path: str) -> bool:
    """Whether the checkpoint's safetensors hold ``pooler.dense.*``, from the index or the file header only.

    The file is the one ``AutoModel.from_pretrained`` reads next (a hub download lands in the cache it then uses).
    Best effort: a ``.bin``-only checkpoint, or any failure to look, counts as "no pooler", i.e. the load of
    before (``add_pooling_layer=False``; transformers then lists any pooler keys as UNEXPECTED) and a zero
    pooler in the export.
    """
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file

    try:
        index = cached_file(name_or_path, SAFE_WEIGHTS_INDEX_NAME, _raise_exceptions_for_missing_entries=False)
        if index is not None:
            keys = json.loads(Path(index).read_text(encoding="utf-8"))["weight_map"]
        else:
            single = cached_file(name_or_path, SAFE_WEIGHTS_NAME, _raise_exceptions_for_missing_entries=False)
            if single is None:
                return False
            from safetensors import safe_open

            with safe_open(single, framework="pt") as f:
                keys = list(f.keys())
    except Exception as err:  # noqa: BLE001 -- only decides whether to keep an unused head
        log.debug("could not list the weights of %s (%s); not keeping a pooler", name_or_path, err)
        return False
    return sum(bool(_POOLER_KEY.search(k)) for k in keys) == 2


def _check_vocab(backbone: nn.Module, tokenizer) -> None:
    if tokenizer is None:
        return
    n_emb = backbone.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_emb:
        raise ConfigError(
            "model.tokenizer",
            f"the tokenizer has {len(tokenizer)} tokens but the backbone's embedding table only {n_emb}",
        )
