"""mia-ptq-bench: how much does a post-training-quantized network leak about its training set?"""

__version__ = "0.2.0"
