"""Chunked contrastive losses (NaViT §2.4; the chunked scheme of Mustafa et al. 2023 / SigLIP).

NaViT pools up to E_max images per packed sequence, so a global contrastive batch is large and
ragged. Materialising the [N_global, N_global] logit matrix (or even one rank's [N_local, N_global]
slice of it) is what limits batch size, so these losses only ever hold an [N_local, chunk] block:

* Each rank's text block travels around a ring of ranks (``batch_isend_irecv``, so gloo, NCCL and
  any backend with point-to-point work); every rank compares its local images against the block it
  currently holds, ``chunk_size`` columns at a time. One process is the one-rank ring.
* The softmax loss normalises image->text over all texts and text->image over all images. The
  former is a running logsumexp kept by the image's rank; the latter is a per-text running
  logsumexp that *travels with the text block* and is handed back to its owner by one last hop.
  The sigmoid loss is a plain sum and needs no such accumulator.
* Gradients: a received block is a fresh buffer with no autograd history, and a differentiable
  all-gather would defeat the point (its backward needs the whole matrix). So each loss is one
  ``autograd.Function`` that saves only O(N_local) statistics (the logsumexps) and whose backward
  runs the ring again: blocks are recomputed (as FlashAttention does), the image gradient
  accumulates locally, and the gradient of the visiting text block travels with it and returns to
  its owner. The result equals the all-gather loss's gradient exactly, up to float rounding.

Conventions:
* Embeddings are used as given: L2-normalise them first (``F.normalize``) as CLIP/SigLIP do. This
  keeps the loss a function of dot products only, and autograd handles the normalisation outside.
* ``logit_scale`` is the multiplier itself (e.g. ``log_t.exp()``), ``logit_bias`` the SigLIP bias;
  both may be tensors that require grad.
* ``valid`` marks the pooling slots that hold an image-text pair. Other slots are zeroed on entry
  (so NaN/inf garbage cannot leak through 0 * inf) and take no part in the loss at all: neither as
  positive nor as negative, nor in the normalising count.
* Every rank returns the same global loss, and ``backward`` is collective (all ranks must call it).
  Each rank receives the full gradient for its own embeddings and its *share* of the gradient of
  the replicated ``logit_scale``/``logit_bias``; shares sum over ranks to the exact gradient, so
  DDP's gradient averaging scales every parameter consistently (by 1 / world size).
* ``group=None`` means no communication: the loss of this process's batch alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx, once_differentiable

__all__ = [
    "softmax_contrastive_loss",
    "sigmoid_contrastive_loss",
    "reference_softmax_contrastive_loss",
    "reference_sigmoid_contrastive_loss",
]

_FIXED_TAG = 0  # tags of the block tensors; the travelling accumulator uses _CARRY_TAG
_CARRY_TAG = 8


class _Pending:
    """Receive buffers of an in-flight shift; keeps the sent tensors alive until completion."""

    def __init__(
        self, works: list[dist.Work], sent: list[torch.Tensor], received: list[torch.Tensor]
    ) -> None:
        self.works, self.sent, self.received = works, sent, received

    def wait(self) -> list[torch.Tensor]:
        for work in self.works:
            work.wait()
        return self.received


class _Ring:
    """Ranks of ``group`` in a ring; block sizes may differ per rank (exchanged once)."""

    def __init__(self, group: dist.ProcessGroup | None, n_local: int, device: torch.device) -> None:
        self.group = group
        if group is None:
            self.world, self.rank, self.sizes = 1, 0, [n_local]
            return
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([n_local], dtype=torch.int64, device=device), group=group)
        self.sizes = [int(s.item()) for s in sizes]
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.world)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.world)

    def owner(self, step: int) -> int:
        """Rank whose block this rank holds at ``step`` (blocks move one rank forward per step)."""
        return (self.rank - step) % self.world

    def shift(self, tensors: list[torch.Tensor], step: int, tag: int) -> _Pending:
        """Start sending the blocks held at ``step`` forward and receiving those of ``step + 1``."""
        n = self.sizes[self.owner(step + 1)]
        sent = [t.contiguous() for t in tensors]
        received = [t.new_empty((n, *t.shape[1:])) for t in sent]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag + i) for i, t in enumerate(sent)]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group, tag + i) for i, t in enumerate(received)]
        return _Pending(dist.batch_isend_irecv(ops), sent, received)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def run(
        self,
        fixed: list[torch.Tensor],
        carry: torch.Tensor | None,
        visit: Callable[[bool, list[torch.Tensor], torch.Tensor | None], None],
    ) -> torch.Tensor | None:
        """Show every rank's ``fixed`` block to ``visit(own, block, carry)`` on every rank.

        ``carry`` (an accumulator for the block, updated in place by ``visit``) travels with the
        block and is back at its owner when this returns. The next block is received while
        ``visit`` computes on the current one.
        """
        for step in range(self.world):
            pending = self.shift(fixed, step, _FIXED_TAG) if step < self.world - 1 else None
            visit(step == 0, fixed, carry)
            if carry is not None and self.world > 1:  # at the last step this hop returns it home
                carry = self.shift([carry], step, _CARRY_TAG).wait()[0]
            if pending is not None:
                fixed = pending.wait()
        return carry


def _chunks(n: int, chunk_size: int | None) -> Iterator[tuple[int, int]]:
    size = n if chunk_size is None else chunk_size
    for start in range(0, n, max(size, 1)):
        yield start, min(start + size, n)


def _diagonal(n_rows: int, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """[n_rows, stop - start] bool: where row i meets its own pair, column i of the own block."""
    return torch.arange(n_rows, device=device)[:, None] == torch.arange(start, stop, device=device)[None, :]


def _prepare(
    img: torch.Tensor,
    txt: torch.Tensor,
    valid: torch.Tensor | None,
    chunk_size: int | None,
    scale: torch.Tensor | float,
    bias: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Checks shapes; returns valid as uint8 (it travels the ring) and scale/bias as tensors."""
    if img.ndim != 2 or img.shape != txt.shape:
        raise ValueError(f"img and txt must both be [N, D], got {tuple(img.shape)} and {tuple(txt.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if valid is None:
        valid = torch.ones(img.shape[0], dtype=torch.bool, device=img.device)
    elif valid.shape != img.shape[:1]:
        raise ValueError(f"valid must be [{img.shape[0]}], got {tuple(valid.shape)}")
    acc = torch.promote_types(img.dtype, torch.float32)
    scale = torch.as_tensor(scale, dtype=acc, device=img.device)
    bias = None if bias is None else torch.as_tensor(bias, dtype=acc, device=img.device)
    return valid.to(torch.uint8), scale, bias


def _ring_inputs(
    img: torch.Tensor, txt: torch.Tensor, valid: torch.Tensor, group: dist.ProcessGroup | None
) -> tuple[torch.dtype, torch.Tensor, torch.Tensor, torch.Tensor, _Ring]:
    """Accumulation dtype, bool mask, embeddings with empty slots zeroed, and the ring."""
    keep = valid.bool()
    x, y = img.masked_fill(~keep[:, None], 0), txt.masked_fill(~keep[:, None], 0)
    return torch.promote_types(img.dtype, torch.float32), keep, x, y, _Ring(group, x.shape[0], x.device)


def _global_sum_and_count(ring: _Ring, total: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss sum and the number of real pairs over all ranks (count at least 1)."""
    stats = ring.all_reduce(torch.stack([total, keep.sum().to(total.dtype)]))
    return stats[0], stats[1].clamp(min=1)


class _SoftmaxRing(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        img: torch.Tensor,
        txt: torch.Tensor,
        valid: torch.Tensor,
        scale: torch.Tensor,
        chunk_size: int | None,
        group: dist.ProcessGroup | None,
    ) -> torch.Tensor:
        acc, keep, x, y, ring = _ring_inputs(img, txt, valid, group)
        t = scale.detach().to(acc)
        lse_img = torch.full((x.shape[0],), float("-inf"), dtype=acc, device=x.device)

        def visit(own: bool, block: list[torch.Tensor], lse_txt: torch.Tensor | None) -> None:
            y_blk, v_blk = block[0], block[1].bool()
            assert lse_txt is not None
            for c0, c1 in _chunks(y_blk.shape[0], chunk_size):
                logits = t * (x @ y_blk[c0:c1].T).to(acc)
                logits = logits.masked_fill(~(keep[:, None] & v_blk[None, c0:c1]), float("-inf"))
                lse_img.copy_(torch.logaddexp(lse_img, logits.logsumexp(1)))
                lse_txt[c0:c1] = torch.logaddexp(lse_txt[c0:c1], logits.logsumexp(0))

        init = torch.full_like(lse_img, float("-inf"))
        lse_txt = ring.run([y, valid], init, visit)
        assert lse_txt is not None
        # Empty slots have logsumexp -inf; 0 keeps exp(s - lse) finite in backward (it is masked).
        lse_img, lse_txt = lse_img.masked_fill(~keep, 0), lse_txt.masked_fill(~keep, 0)
        positive = t * (x * y).sum(-1).to(acc)
        total = torch.where(keep, lse_img + lse_txt - 2 * positive, 0).sum()
        total, count = _global_sum_and_count(ring, total, keep)
        ctx.save_for_backward(x, y, valid, scale, lse_img, lse_txt)
        ctx.chunk_size, ctx.ring, ctx.count = chunk_size, ring, count
        return total / (2 * count)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, y, valid, scale, lse_img, lse_txt = ctx.saved_tensors
        ring: _Ring = ctx.ring
        acc = lse_img.dtype
        keep, t = valid.bool(), scale.to(acc)
        coef = grad.to(acc) / (2 * ctx.count)
        x_acc = x.to(acc)
        grad_x = torch.zeros_like(x_acc)
        grad_t = torch.zeros((), dtype=acc, device=x.device)

        def visit(own: bool, block: list[torch.Tensor], grad_y: torch.Tensor | None) -> None:
            nonlocal grad_t
            y_blk, v_blk, lse_blk = block[0], block[1].bool(), block[2]
            assert grad_y is not None
            for c0, c1 in _chunks(y_blk.shape[0], ctx.chunk_size):
                y_c = y_blk[c0:c1].to(acc)
                dots = (x @ y_blk[c0:c1].T).to(acc)
                logits = t * dots
                # d(loss)/d(logit_ij) = (softmax over texts + softmax over images - 2 [i == j]) / 2M
                g = (logits - lse_img[:, None]).exp() + (logits - lse_blk[None, c0:c1]).exp()
                if own:
                    g = g - 2 * _diagonal(x.shape[0], c0, c1, x.device).to(acc)
                g = torch.where(keep[:, None] & v_blk[None, c0:c1], g * coef, 0)
                grad_x.add_(g @ y_c)
                grad_y[c0:c1] += g.T @ x_acc
                grad_t = grad_t + (g * dots).sum()

        grad_y = ring.run([y, valid, lse_txt], torch.zeros_like(x_acc), visit)
        assert grad_y is not None
        return (
            (grad_x * t).to(x.dtype),
            (grad_y * t).to(y.dtype),
            None,
            grad_t.reshape(scale.shape).to(scale.dtype),
            None,
            None,
        )


class _SigmoidRing(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        img: torch.Tensor,
        txt: torch.Tensor,
        valid: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor,
        chunk_size: int | None,
        group: dist.ProcessGroup | None,
    ) -> torch.Tensor:
        acc, keep, x, y, ring = _ring_inputs(img, txt, valid, group)
        t, b = scale.detach().to(acc), bias.detach().to(acc)
        total = torch.zeros((), dtype=acc, device=x.device)

        def visit(own: bool, block: list[torch.Tensor], carry: torch.Tensor | None) -> None:
            nonlocal total
            y_blk, v_blk = block[0], block[1].bool()
            for c0, c1 in _chunks(y_blk.shape[0], chunk_size):
                logits = t * (x @ y_blk[c0:c1].T).to(acc) + b
                if own:  # labels: +1 for the pair, -1 for every other combination
                    logits = torch.where(_diagonal(x.shape[0], c0, c1, x.device), -logits, logits)
                loss = -F.logsigmoid(-logits)
                total = total + torch.where(keep[:, None] & v_blk[None, c0:c1], loss, 0).sum()

        ring.run([y, valid], None, visit)
        total, count = _global_sum_and_count(ring, total, keep)
        ctx.save_for_backward(x, y, valid, scale, bias)
        ctx.chunk_size, ctx.ring, ctx.count = chunk_size, ring, count
        return total / count

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, y, valid, scale, bias = ctx.saved_tensors
        ring: _Ring = ctx.ring
        acc = torch.promote_types(x.dtype, torch.float32)
        keep, t, b = valid.bool(), scale.to(acc), bias.to(acc)
        coef = grad.to(acc) / ctx.count
        x_acc = x.to(acc)
        grad_x = torch.zeros_like(x_acc)
        grad_t = torch.zeros((), dtype=acc, device=x.device)
        grad_b = torch.zeros((), dtype=acc, device=x.device)

        def visit(own: bool, block: list[torch.Tensor], grad_y: torch.Tensor | None) -> None:
            nonlocal grad_t, grad_b
            y_blk, v_blk = block[0], block[1].bool()
            assert grad_y is not None
            for c0, c1 in _chunks(y_blk.shape[0], ctx.chunk_size):
                y_c = y_blk[c0:c1].to(acc)
                dots = (x @ y_blk[c0:c1].T).to(acc)
                g = torch.sigmoid(t * dots + b)  # d/ds of -log sigmoid(z s) is sigmoid(s) - [z = +1]
                if own:
                    g = g - _diagonal(x.shape[0], c0, c1, x.device).to(acc)
                g = torch.where(keep[:, None] & v_blk[None, c0:c1], g * coef, 0)
                grad_x.add_(g @ y_c)
                grad_y[c0:c1] += g.T @ x_acc
                grad_t = grad_t + (g * dots).sum()
                grad_b = grad_b + g.sum()

        grad_y = ring.run([y, valid], torch.zeros_like(x_acc), visit)
        assert grad_y is not None
        return (
            (grad_x * t).to(x.dtype),
            (grad_y * t).to(y.dtype),
            None,
            grad_t.reshape(scale.shape).to(scale.dtype),
            grad_b.reshape(bias.shape).to(bias.dtype),
            None,
            None,
        )


def softmax_contrastive_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    *,
    logit_scale: torch.Tensor | float,
    valid: torch.Tensor | None = None,
    chunk_size: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """CLIP loss: mean of image->text and text->image cross entropy over the global batch.

    img, txt: [N_local, D] paired embeddings (pair i is img[i], txt[i]); valid: [N_local] bool.
    Peak extra memory is O(N_local * (chunk_size + D)); the ring runs over ``group`` if given.
    """
    valid_u8, scale, _ = _prepare(img, txt, valid, chunk_size, logit_scale)
    return _SoftmaxRing.apply(img, txt, valid_u8, scale, chunk_size, group)


def sigmoid_contrastive_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    *,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    valid: torch.Tensor | None = None,
    chunk_size: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """SigLIP loss: sum over all image-text combinations of -log sigmoid(label * logit) / #images.

    Arguments as for :func:`softmax_contrastive_loss`; logit = scale * <img, txt> + bias.
    """
    valid_u8, scale, bias = _prepare(img, txt, valid, chunk_size, logit_scale, logit_bias)
    assert bias is not None
    return _SigmoidRing.apply(img, txt, valid_u8, scale, bias, chunk_size, group)


def _select(
    img: torch.Tensor, txt: torch.Tensor, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    return (img, txt) if valid is None else (img[valid], txt[valid])


def reference_softmax_contrastive_loss(
    img: torch.Tensor, txt: torch.Tensor, *, logit_scale: torch.Tensor | float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain full-matrix CLIP loss of an already gathered batch (the definition, for testing)."""
    img, txt = _select(img, txt, valid)
    logits = logit_scale * img @ txt.T
    labels = torch.arange(img.shape[0], device=img.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def reference_sigmoid_contrastive_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    *,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain full-matrix SigLIP loss of an already gathered batch (the definition, for testing)."""
    img, txt = _select(img, txt, valid)
    logits = logit_scale * img @ txt.T + logit_bias
    labels = 2 * torch.eye(img.shape[0], device=img.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / max(img.shape[0], 1)
