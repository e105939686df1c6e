"""Offline artifact builder: synthetic interactions, user pairing, BPR training, export.

May import torch; nothing online imports this package. Entry point:
``offline.build.build_artifacts``.
"""
