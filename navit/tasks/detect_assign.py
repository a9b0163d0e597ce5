"""Which token learns which ground-truth box (``--assign``), for ``--task detect``.

* ``hungarian`` (:func:`match`): DETR's one-to-one assignment per example by
  ``scipy.optimize.linear_sum_assignment`` on the focal class cost, L1 and generalised IoU of the
  current predictions.
* ``centre`` (:func:`centre_match`): a fixed, dense assignment as in CenterNet / FCOS: each box goes
  to the token whose patch holds its centre (the nearest free token of its example when that one is
  dropped or taken, smaller boxes choosing first). It does not depend on the predictions, so the
  targets are stable from the first step.

Both return (token indices, box indices) of the matched pairs over the real tokens of a batch.
"""

from __future__ import annotations

import numpy as np
import torch

from navit.boxes import cxcywh_to_xyxy, generalized_box_iou

FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0
ASSIGNMENTS = ("hungarian", "centre")


@torch.no_grad()
def match(logits: torch.Tensor, boxes: torch.Tensor, owner: torch.Tensor, gt_boxes: torch.Tensor,
          gt_labels: torch.Tensor, gt_owner: torch.Tensor, weights: tuple[float, float, float]) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Hungarian assignment of tokens to ground-truth boxes of the same example: ``logits`` [T, C]
    and ``boxes`` [T, 4] (cx, cy, w, h) of the real tokens, ``owner`` [T] their example; the
    boxes [M, 4], labels [M] and examples [M] of the truth. The cost of a pair is DETR's:
    ``class_weight`` × focal class cost + ``l1_weight`` × L1 − ``giou_weight`` × GIoU."""
    from scipy.optimize import linear_sum_assignment

    if not len(gt_labels):
        return owner.new_zeros(0), owner.new_zeros(0)
    p = logits.float().sigmoid()[:, gt_labels]  # [T, M]
    positive = FOCAL_ALPHA * (1 - p) ** FOCAL_GAMMA * -(p + 1e-8).log()
    negative = (1 - FOCAL_ALPHA) * p**FOCAL_GAMMA * -(1 - p + 1e-8).log()
    w_class, w_l1, w_giou = weights
    cost = (w_class * (positive - negative) + w_l1 * torch.cdist(boxes.float(), gt_boxes.float(), p=1)
            - w_giou * generalized_box_iou(cxcywh_to_xyxy(boxes.float()), cxcywh_to_xyxy(gt_boxes.float())))  # fmt: skip
    cost, owner_np, gt_owner_np = cost.cpu().numpy(), owner.cpu().numpy(), gt_owner.cpu().numpy()
    tokens, truths = [], []
    for example in np.unique(gt_owner_np):
        rows, cols = np.flatnonzero(owner_np == example), np.flatnonzero(gt_owner_np == example)
        r, c = linear_sum_assignment(cost[np.ix_(rows, cols)])
        tokens.append(rows[r])
        truths.append(cols[c])
    return _pairs(tokens, truths, owner.device)


@torch.no_grad()
def centre_match(cells: torch.Tensor, grids: torch.Tensor, owner: torch.Tensor, gt_boxes: torch.Tensor,
                 gt_owner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Each box to the token whose patch holds its centre: ``cells`` [T, 2] (row, col) of the real
    tokens, ``grids`` [T, 2] (rows, cols) of their example, ``owner`` [T] their example; boxes
    [M, 4] (cx, cy, w, h as shares of the canvas) and their examples [M]. Distances are in
    patches, so the nearest token is the one whose patch holds the centre; a box whose token is
    dropped or already taken (smaller boxes choose first) gets the nearest free one, and a box of
    an example with no free token none."""
    device = owner.device
    cells, grids, owner = cells.cpu().double(), grids.cpu().double(), owner.cpu()
    gt_boxes, gt_owner = gt_boxes.cpu().double(), gt_owner.cpu()
    tokens, truths = [], []
    for example in gt_owner.unique().tolist():
        mine = torch.nonzero(owner == example).squeeze(1)
        boxes = torch.nonzero(gt_owner == example).squeeze(1)
        centres = (cells[mine] + 0.5) / grids[mine]  # [t, 2] (y, x) shares
        size = grids[mine]  # patches per share, per token (the same for the whole example)
        box_yx = gt_boxes[boxes][:, [1, 0]]  # [m, 2]
        dist = (((box_yx[None, :, :] - centres[:, None, :]) * size[:, None, :]) ** 2).sum(-1)  # [t, m]
        free = torch.ones(len(mine), dtype=torch.bool)
        for b in (gt_boxes[boxes][:, 2] * gt_boxes[boxes][:, 3]).argsort(stable=True).tolist():
            if not free.any():
                break
            t = int(torch.where(free, dist[:, b], torch.full_like(dist[:, b], torch.inf)).argmin())
            free[t] = False
            tokens.append(mine[t : t + 1].numpy())
            truths.append(boxes[b : b + 1].numpy())
    return _pairs(tokens, truths, device)


def _pairs(tokens: list[np.ndarray], truths: list[np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if not tokens:
        return torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, dtype=torch.long, device=device)
    return (torch.from_numpy(np.concatenate(tokens)).long().to(device),
            torch.from_numpy(np.concatenate(truths)).long().to(device))  # fmt: skip
