"""Box operations on torch tensors: conversions, pairwise IoU and generalised IoU.

Boxes are ``[..., 4]`` tensors, either corners ``(x1, y1, x2, y2)`` ("xyxy") or centre and size
``(cx, cy, w, h)`` ("cxcywh"). Pairwise functions take ``[n, 4]`` and ``[m, 4]`` corner boxes and
give ``[n, m]``.
"""

from __future__ import annotations

import torch


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], -1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Areas of corner boxes (zero for inverted ones)."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _inter_union(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    return inter, box_area(a)[:, None] + box_area(b)[None, :] - inter


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n, m] intersection over union of corner boxes ``a`` [n, 4] and ``b`` [m, 4]."""
    inter, union = _inter_union(a, b)
    return inter / union.clamp(min=1e-9)


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n, m] generalised IoU (Rezatofighi et al. 2019): IoU minus the share of the smallest
    enclosing box that neither box covers; in [-1, 1], 1 for equal boxes."""
    inter, union = _inter_union(a, b)
    iou = inter / union.clamp(min=1e-9)
    hull = (torch.maximum(a[:, None, 2:], b[None, :, 2:]) - torch.minimum(a[:, None, :2], b[None, :, :2])).clamp(min=0)
    enclosing = hull.prod(-1)
    return iou - (enclosing - union) / enclosing.clamp(min=1e-9)
