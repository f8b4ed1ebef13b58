"""Victim: what a model trainer does with a published set: transform it, train a CLIP, evaluate."""
