"""Ingest: a dataset (folder, CSV, HF, shards, synthetic) into clean, checked WebDataset shards."""
