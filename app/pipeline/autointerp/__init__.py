"""Automatic descriptions of SAE features: explainers write drafts, scorers measure how well a
description predicts activations (see backends.py for the chat contract both use)."""
