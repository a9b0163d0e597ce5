"""The paper's claims, one command each: ``navit experiment NAME --data DATA --out DIR``.

Each experiment trains (or measures) its arms on the given data, writes ``DIR/NAME/results.json``
(every run's settings, training FLOPs, images and tokens seen, validation accuracy), a
``report.md`` with the table and a verdict per claim, and PNG plots. ``--quick`` runs a tiny
version for the tests. See :mod:`navit.experiments.base` for how verdicts are reached.
"""

from __future__ import annotations

from navit.experiments.attention_share import AttentionShare
from navit.experiments.base import Experiment, Setting
from navit.experiments.budget import Budget
from navit.experiments.compute import Compute
from navit.experiments.posemb import PosEmb
from navit.experiments.resolution import Resolution
from navit.experiments.token_drop import TokenDrop

EXPERIMENTS: dict[str, type[Experiment]] = {
    cls.name: cls for cls in (Compute, Resolution, TokenDrop, PosEmb, Budget, AttentionShare)
}

__all__ = ["EXPERIMENTS", "Experiment", "Setting"]
