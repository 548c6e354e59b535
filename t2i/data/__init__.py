"""Data side of the pipeline: raw releases -> shards -> tokenizer -> streaming batches.

Nothing here imports a model, so the data tools run without the model code.
"""
