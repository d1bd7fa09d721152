"""Serving side of DEC: the MLflow pyfunc over the ONNX graph and the code that logs it.

- ``serving.onnx_pyfunc``: the pyfunc model (models-from-code; needs only mlflow, numpy, pandas and
  onnxruntime where it is served).
- ``serving.model_io``: ``log_dec_model``, which exports, verifies and logs a fitted network.
"""
