"""Victim: what a model trainer does with a published set: train a CLIP, evaluate it."""
