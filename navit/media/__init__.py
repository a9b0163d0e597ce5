"""Decoding media files: images (:mod:`navit.media.image`) and clips (:mod:`navit.media.video`).

This is the lowest data layer: it knows files and pixels, nothing about models, tokens or tasks.
"""
