"""ByteTokenizer (round trip, truncation, masks) and TextTransformer (padding invariance, grads)."""

from __future__ import annotations

import pickle

import pytest
import torch

from navit.text import ByteTokenizer, TextTransformer

TEXTS = ["a tall ellipse", "", "naïve café — 東京 🙂", "x"]


def test_vocab_and_specials():
    tok = ByteTokenizer()
    assert tok.vocab_size == 259
    assert {tok.BOS, tok.EOS, tok.PAD} == {256, 257, 258}
    assert max(tok.BOS, tok.EOS, tok.PAD) == tok.vocab_size - 1


def test_round_trip_including_non_ascii_and_empty():
    tok = ByteTokenizer(max_len=64)
    ids, mask = tok.encode(TEXTS)
    assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == mask.shape
    lengths = [len(t.encode("utf-8")) + 2 for t in TEXTS]
    assert ids.shape == (len(TEXTS), max(lengths))
    assert mask.sum(1).tolist() == lengths
    assert tok.decode(ids) == TEXTS
    assert tok.decode(ids[2]) == TEXTS[2]
    for text, row, n in zip(TEXTS, ids, lengths):
        assert row[0] == tok.BOS and row[n - 1] == tok.EOS
        assert (row[n:] == tok.PAD).all()
        # Token ids are the UTF-8 bytes, in order.
        assert bytes(row[1 : n - 1].tolist()) == text.encode("utf-8")
    assert tok.last_num_truncated == 0 and tok.num_truncated == 0
    # Mask is True exactly at non-PAD tokens, contiguous from the start.
    assert torch.equal(mask, ids != tok.PAD)
    assert torch.equal(mask, mask.cummin(dim=1).values)


def test_pad_to_gives_fixed_shape():
    tok = ByteTokenizer(max_len=32)
    ids, mask = tok.encode(["ab", "abcd"], pad_to=20)
    assert ids.shape == (2, 20) and mask.sum(1).tolist() == [4, 6]
    with pytest.raises(ValueError, match="pad_to"):
        tok.encode(["abcdef"], pad_to=4)


def test_truncation_keeps_eos_counts_and_never_splits_characters():
    tok = ByteTokenizer(max_len=8)
    ids, mask = tok.encode(["abcdefghij", "abc", "ééééé"])  # é is 2 bytes: 10 bytes > 6
    assert ids.shape == (3, 8)
    assert tok.last_num_truncated == 2 and tok.num_truncated == 2
    assert ids[0, -1] == tok.EOS and mask[0].all()
    assert tok.decode(ids[0]) == "abcdef"
    # 6 bytes of room hold 3 whole é's; the cut backs off to a character boundary.
    assert tok.decode(ids[2]) == "ééé" and mask[2].sum() == 8
    assert ids[2, 7] == tok.EOS
    tok.encode(["short"])
    assert tok.last_num_truncated == 0 and tok.num_truncated == 2
    # Cutting in the middle of a 4-byte character drops the whole character.
    ids, _ = ByteTokenizer(max_len=7).encode(["ab🙂"])  # room 5: 'ab' + 3 of 4 bytes
    assert ByteTokenizer().decode(ids[0]) == "ab"


def test_truncation_modes():
    with pytest.warns(UserWarning, match="1 of 2 texts.*truncated"):
        ByteTokenizer(max_len=4, truncation="warn").encode(["ab", "abc"])
    with pytest.raises(ValueError, match="truncated"):
        ByteTokenizer(max_len=4, truncation="error").encode(["abc"])
    ByteTokenizer(max_len=4, truncation="error").encode(["ab"])  # fits: no error
    with pytest.raises(ValueError):
        ByteTokenizer(truncation="silently")
    with pytest.raises(ValueError):
        ByteTokenizer(max_len=2)


def test_encode_rejects_a_bare_string_and_non_strings():
    tok = ByteTokenizer()
    with pytest.raises(TypeError, match="list"):
        tok.encode("abc")
    with pytest.raises(TypeError, match="text 1"):
        tok.encode(["a", 3])
    assert pickle.loads(pickle.dumps(tok)).encode(["a"])[0].tolist() == [[256, 97, 257]]


def _model(**kw) -> TextTransformer:
    torch.manual_seed(0)
    args = dict(width=32, depth=2, num_heads=4, max_len=40, mlp_ratio=2.0)
    args.update(kw)
    return TextTransformer(ByteTokenizer().vocab_size, **args).eval()


def test_output_shape_and_texts_differ():
    tok, model = ByteTokenizer(max_len=40), _model()
    out = model(*tok.encode(TEXTS))
    assert out.shape == (len(TEXTS), 32) and torch.isfinite(out).all()
    assert (out[0] - out[3]).abs().max() > 1e-3


def test_embedding_independent_of_padding_length():
    tok, model = ByteTokenizer(max_len=40), _model()
    text = "a small navy wide rectangle."
    alone = model(*tok.encode([text]))[0]
    for pad_to in (31, 35, 40):
        ids, mask = tok.encode([text], pad_to=pad_to)
        out = model(ids, mask)[0]
        assert (out - alone).abs().max() <= 1e-5, pad_to
    # Batched with a longer text (so padded), and with garbage ids in the padding.
    ids, mask = tok.encode([text, "a much longer caption that forces padding!"])
    assert ids.shape[1] > mask[0].sum()
    ids[0][~mask[0]] = 97
    out = model(ids, mask)[0]
    assert (out - alone).abs().max() <= 1e-5
    # The mask matters: treating the padding as real changes the embedding.
    assert (model(ids, torch.ones_like(mask))[0] - alone).abs().max() > 1e-3


def test_empty_mask_row_gives_zeros_not_nan():
    model = _model()
    ids = torch.full((2, 5), ByteTokenizer.PAD)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1, :3] = True
    out = model(ids, mask)
    assert torch.isfinite(out).all() and (out[0] == 0).all() and out[1].abs().sum() > 0


def test_gradients_reach_every_parameter():
    tok, model = ByteTokenizer(max_len=40), _model().train()
    out = model(*tok.encode(TEXTS))
    (out * torch.randn_like(out)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_validation():
    model = _model(max_len=8)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 9, dtype=torch.long), torch.ones(1, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="divisible"):
        TextTransformer(259, width=30, num_heads=4)
