"""Specialist fine-tuning from θ0 with the DF40 recipe (paper B.2)."""

from r2m.training.specialist import TrainResult, train_specialist

__all__ = ["TrainResult", "train_specialist"]
