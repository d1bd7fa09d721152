"""Deep Embedded Clustering (Xie, Girshick, Farhadi, ICML 2016) with an MLflow + ONNX lifecycle."""

from dec_mlflow.estimator import DEC, PretrainedAutoencoder

__all__ = ["DEC", "PretrainedAutoencoder"]
__version__ = "0.1.0"
