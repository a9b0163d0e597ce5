"""The text side of contrastive image-text training: a byte tokenizer and a small transformer.

:class:`ByteTokenizer` needs no vocabulary file or download: token ids 0..255 are the bytes of the
UTF-8 encoding, followed by three specials (BOS, EOS, PAD). Any string, in any script, encodes
losslessly (up to truncation).

:class:`TextTransformer` is a pre-norm bidirectional transformer with a key padding mask and
masked mean pooling, so a text's embedding does not depend on how much padding its batch has.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ByteTokenizer", "TextTransformer", "TRUNCATION_MODES"]

#: What :class:`ByteTokenizer` does when a text is longer than ``max_len`` tokens.
TRUNCATION_MODES = ("count", "warn", "error")


class ByteTokenizer:
    """Byte-level UTF-8 tokenizer: ids 0..255 are bytes, then BOS, EOS and PAD.

    ``encode(texts)`` returns ``(ids, mask)``: ``ids`` is ``[N, T]`` long, each row
    ``BOS, bytes..., EOS`` followed by PAD; ``mask`` is ``[N, T]`` bool, True at real tokens
    (BOS and EOS included). ``T`` is the longest encoded text of the call, or ``pad_to`` if given
    (a fixed shape for ``torch.compile``).

    Truncation: a text whose encoding has more than ``max_len`` tokens keeps its first
    ``max_len - 2`` bytes (cut back to a whole UTF-8 character, so a truncated text still decodes
    cleanly), then EOS; EOS is always the last real token. Truncation is never silent:
    :attr:`last_num_truncated` is the number of texts truncated by the latest ``encode`` call and
    :attr:`num_truncated` the running total, and ``truncation="warn"`` also warns and
    ``truncation="error"`` raises instead. The default, ``"count"``, only counts (captions are
    commonly truncated on purpose).
    """

    NUM_BYTES = 256
    BOS, EOS, PAD = 256, 257, 258

    def __init__(self, max_len: int = 64, *, truncation: str = "count") -> None:
        if isinstance(max_len, bool) or int(max_len) != max_len or max_len < 3:
            raise ValueError(f"max_len must be an integer >= 3 (BOS, one byte, EOS), got {max_len!r}")
        if truncation not in TRUNCATION_MODES:
            raise ValueError(f"truncation={truncation!r}; expected one of {TRUNCATION_MODES}")
        self.max_len = int(max_len)
        self.truncation = truncation
        self.last_num_truncated = 0
        self.num_truncated = 0

    @property
    def vocab_size(self) -> int:
        return self.NUM_BYTES + 3

    def __repr__(self) -> str:
        return f"ByteTokenizer(max_len={self.max_len}, truncation={self.truncation!r})"

    def _bytes(self, text: str, index: int) -> tuple[bytes, bool]:
        if not isinstance(text, str):
            raise TypeError(f"text {index} is a {type(text).__name__}, expected str")
        data = text.encode("utf-8")
        room = self.max_len - 2
        if len(data) <= room:
            return data, False
        cut = room
        # Back off over UTF-8 continuation bytes (0b10xxxxxx) so no character is split.
        while cut > 0 and (data[cut] & 0xC0) == 0x80:
            cut -= 1
        return data[:cut], True

    def encode(
        self, texts: Sequence[str], *, pad_to: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [N, T] (long) and mask [N, T] (bool, True at real tokens) of ``texts``."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings; wrap a single text as [text]")
        encoded, truncated = [], []
        for i, text in enumerate(texts):
            data, cut = self._bytes(text, i)
            encoded.append(data)
            if cut:
                truncated.append(i)
        self.last_num_truncated = len(truncated)
        self.num_truncated += len(truncated)
        if truncated and self.truncation != "count":
            msg = (
                f"{len(truncated)} of {len(encoded)} texts are longer than max_len={self.max_len} "
                f"tokens and were truncated (first: text {truncated[0]})"
            )
            if self.truncation == "error":
                raise ValueError(msg)
            warnings.warn(msg, stacklevel=2)
        longest = max((len(d) + 2 for d in encoded), default=2)
        length = longest if pad_to is None else int(pad_to)
        if length < longest:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest encoded text ({longest} tokens)")
        ids = torch.full((len(encoded), length), self.PAD, dtype=torch.long)
        for row, data in enumerate(encoded):
            n = len(data)
            ids[row, 0] = self.BOS
            if n:
                ids[row, 1 : n + 1] = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
            ids[row, n + 1] = self.EOS
        mask = ids != self.PAD
        return ids, mask

    def decode(self, ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]]) -> str | list[str]:
        """Text of one id sequence (1-D) or a list of texts (2-D); specials are dropped.

        Decoding stops at the first EOS; invalid UTF-8 (e.g. ids that never came from
        :meth:`encode`) shows as U+FFFD.
        """
        t = torch.as_tensor(ids)
        if t.ndim == 2:
            return [self.decode(row) for row in t]
        if t.ndim != 1:
            raise ValueError(f"decode takes [T] or [N, T] ids, got shape {tuple(t.shape)}")
        out = bytearray()
        for v in t.tolist():
            if v == self.EOS:
                break
            if 0 <= v < self.NUM_BYTES:
                out.append(v)
        return out.decode("utf-8", errors="replace")


class _TextBlock(nn.Module):
    def __init__(self, width: int, num_heads: int, hidden: int, eps: float, act: str) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        gelu = nn.GELU(approximate="tanh" if act == "gelu_tanh" else "none")
        self.mlp = nn.Sequential(nn.Linear(width, hidden), gelu, nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [N, H, T, Dh]
        x = x + self.proj(out.transpose(1, 2).reshape(n, t, d))
        return x + self.mlp(self.norm2(x))


class TextTransformer(nn.Module):
    """Token + learned position embedding, pre-norm transformer blocks, final LayerNorm, pooling.

    ``forward(ids, mask)`` takes ids [N, T] (T <= ``max_len``) and a mask [N, T] (True at real
    tokens) and returns one vector per text, [N, width].

    Attention is bidirectional with a key padding mask only (no causal mask), and the output is
    the **masked mean** of the final token features (``pool="last"``: the features of the last
    position, as SigLIP's text tower pools). Why the mean rather than the EOS token: with
    bidirectional attention no position is special, the mean gives every token a direct gradient
    path, it matches the image tower's mean/MAP pooling over patches, and it needs no knowledge of
    where EOS sits (ids from another tokenizer, or without EOS, work unchanged). Padding never
    contributes: padded keys are masked out of attention and padded rows out of the mean, so a
    text's embedding is the same whatever length its batch is padded to. A text with no real
    token at all embeds to zeros.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        width: int = 128,
        depth: int = 2,
        num_heads: int = 4,
        max_len: int = 64,
        mlp_ratio: float = 4.0,
        mlp_dim: int | None = None,
        norm_eps: float = 1e-6,
        act: str = "gelu",
        pool: str = "mean",
    ) -> None:
        super().__init__()
        if pool not in ("mean", "last"):
            raise ValueError(f"TextTransformer pool={pool!r}; expected 'mean' or 'last'")
        for name, value in (("vocab_size", vocab_size), ("width", width), ("depth", depth),
                            ("num_heads", num_heads), ("max_len", max_len)):
            if value < 1:
                raise ValueError(f"TextTransformer {name} must be >= 1, got {value}")
        if width % num_heads:
            raise ValueError(f"width={width} is not divisible by num_heads={num_heads}")
        self.vocab_size, self.width, self.max_len, self.pool = vocab_size, width, max_len, pool
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(max_len, width))
        hidden = mlp_dim or int(width * mlp_ratio)
        self.blocks = nn.ModuleList(_TextBlock(width, num_heads, hidden, norm_eps, act) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=norm_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # Scale residual output projections down with depth (GPT-2 style) for a stable start.
        for block in self.blocks:
            for lin in (block.proj, block.mlp[2]):
                lin.weight.data.mul_(1.0 / math.sqrt(2 * len(self.blocks)))

    def forward_features(self, ids: torch.Tensor, mask: torch.Tensor, *, zero_padding: bool = True) -> torch.Tensor:
        """Per-token features [N, T, width] after the final norm; zeros at padding (unless not
        ``zero_padding``)."""
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise ValueError(f"ids and mask must both be [N, T], got {tuple(ids.shape)} and {tuple(mask.shape)}")
        if ids.shape[1] > self.max_len:
            raise ValueError(f"texts have {ids.shape[1]} tokens, more than max_len={self.max_len}")
        mask = mask.bool()
        x = self.token_embed(ids) + self.pos_embed[: ids.shape[1]]
        # Key padding mask, [N, 1, 1, T]: True = may be attended to. A row with no real token
        # would softmax over nothing (NaN); let it attend everywhere, its output is masked anyway.
        keys = mask | ~mask.any(dim=1, keepdim=True)
        attn_mask = keys[:, None, None, :]
        for block in self.blocks:
            x = block(x, attn_mask)
        x = self.norm(x)
        return x * mask[..., None].to(x.dtype) if zero_padding else x

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One vector per text [N, width]: the masked mean of the token features, or the last
        position's features (``pool="last"``)."""
        if self.pool == "last":
            return self.forward_features(ids, mask, zero_padding=False)[:, -1]
        tokens = self.forward_features(ids, mask)
        count = mask.sum(dim=1, keepdim=True).clamp(min=1).to(tokens.dtype)
        return tokens.sum(dim=1) / count


class PretrainedTokenizer:
    """A Hugging Face tokenizer (``tokenizer.json`` and friends in a local folder) with the
    :class:`ByteTokenizer` interface: ``encode(texts) -> (ids, mask)``, padded to ``max_len``
    tokens as SigLIP was trained (``padding="max_length"``), truncated beyond."""

    def __init__(self, tokenizer, max_len: int = 64, *, lowercase: bool = False) -> None:
        self.tokenizer, self.max_len, self.lowercase = tokenizer, max_len, lowercase
        self.last_num_truncated = self.num_truncated = 0  # texts cut at max_len, as ByteTokenizer counts

    @classmethod
    def from_folder(cls, folder, max_len: int = 64, **kwargs) -> "PretrainedTokenizer":
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(folder)), max_len, **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings; wrap a single text as [text]")
        texts = [t.lower() for t in texts] if self.lowercase else list(texts)
        out = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_len, return_tensors="pt")
        longer = self.tokenizer(texts, truncation=True, max_length=self.max_len + 1)["input_ids"]
        self.last_num_truncated = sum(len(ids) > self.max_len for ids in longer)
        self.num_truncated += self.last_num_truncated
        ids = out["input_ids"]
        return ids, out.get("attention_mask", torch.ones_like(ids)).bool()
