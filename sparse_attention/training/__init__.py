"""Training: the data pipeline, the trainer and the commands around the Sparse Transformer models."""
