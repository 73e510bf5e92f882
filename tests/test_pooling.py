"""Pooling with padding masks: pad positions never leak into the vector."""

from __future__ import annotations

import torch

from me5.models.pooling import cls_pool, last_token_pool, mean_pool


def _batch():
    torch.manual_seed(0)
    h = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    return h, mask


def test_mean_pool_ignores_padding():
    h, mask = _batch()
    out = mean_pool(h, mask)
    for i in range(3):
        n = int(mask[i].sum())
        torch.testing.assert_close(out[i], h[i, :n].mean(0))
    # changing padded positions changes nothing
    h2 = h.clone()
    h2[mask == 0] = 1e6
    torch.testing.assert_close(mean_pool(h2, mask), out)


def test_mean_pool_empty_row_is_zero_not_nan():
    h = torch.randn(1, 3, 2)
    assert torch.equal(mean_pool(h, torch.zeros(1, 3, dtype=torch.long)), torch.zeros(1, 2))


def test_cls_pool_takes_first_token():
    h, mask = _batch()
    torch.testing.assert_close(cls_pool(h, mask), h[:, 0])


def test_last_token_pool_right_and_left_padding():
    h, mask = _batch()
    out = last_token_pool(h, mask)
    torch.testing.assert_close(out, torch.stack([h[0, 4], h[1, 1], h[2, 2]]))
    left = torch.flip(mask, dims=[1])  # left padding: real tokens end at the last position
    torch.testing.assert_close(last_token_pool(h, left), h[:, -1])


def test_encoder_pooling_matches_reference_under_padding():
    from transformers import BertConfig, BertModel

    from me5.models.encoder import Encoder

    torch.manual_seed(0)
    backbone = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=32), add_pooling_layer=False).eval()
    enc = Encoder(backbone, pooling="mean", normalize=True)
    ids = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])
    mask = (ids != 0).long()
    out = enc(ids, mask)
    # each row alone, without padding, gives the same vector
    for i in range(2):
        n = int(mask[i].sum())
        alone = enc(ids[i : i + 1, :n], mask[i : i + 1, :n])
        torch.testing.assert_close(out[i : i + 1], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))
