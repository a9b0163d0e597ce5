"""The built-in data sets, generated from (seed, index): no files, no downloads.

``shapes`` (``synthetic``), ``hard`` (``synthetic-hard``), ``video`` (``synthetic-video``) and
``segmentation`` (``synthetic-seg``). Each is a source like any other (see :mod:`navit.data`).
"""
