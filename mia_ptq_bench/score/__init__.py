"""Scoring: how confidently a model predicts the true label of each example."""

from .confidence import logit_scaled_confidence
from .inference import accuracy, predict_logits, score_split
from .queries import QUERIES

__all__ = ["QUERIES", "accuracy", "logit_scaled_confidence", "predict_logits", "score_split"]
