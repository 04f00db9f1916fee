"""Inference, a service the pool and the evaluation both use: logits, scores and accuracy of a model.

The membership score of one prediction is the logit-scaled confidence of the true label,
computed for each fixed query (the image, its mirror).
"""

from .confidence import logit_scaled_confidence
from .predict import accuracy, eval_mode, predict_logits, score_split
from .queries import QUERIES

__all__ = ["QUERIES", "accuracy", "eval_mode", "logit_scaled_confidence", "predict_logits", "score_split"]
