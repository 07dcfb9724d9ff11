"""Training Sparse Transformers: `sparse-attention train`, `eval`, `generate` and `demo`.

    from sparse_attention.training import TrainConfig, run_session
    run_session(TrainConfig(data="notes/", out="runs/notes", steps=2000, compare="dense"))
"""

from sparse_attention.training.config import TrainConfig
from sparse_attention.training.session import SessionResult, run_session
from sparse_attention.training.trainer import RunResult, train

__all__ = ["RunResult", "SessionResult", "TrainConfig", "run_session", "train"]
