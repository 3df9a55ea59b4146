"""Data preparation: dialogue adapters, tokenization, packing, SMR/LMR samples, Parquet shards.

Imports nothing from ``pipeline``: it runs on CPU-only workers without DeepSpeed or a model.
"""
