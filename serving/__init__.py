"""Serving side of DEC: the MLflow pyfunc over the ONNX graph, the code that logs and loads it, the server.

- ``serving.onnx_pyfunc``: the pyfunc model (models-from-code; needs only mlflow, numpy, pandas and
  onnxruntime where it is served).
- ``serving.model_io``: ``log_dec_model``, which exports, verifies and logs a fitted network.
- ``serving.loading``: ``load_dec_model``, which loads a logged model without running code stored with it.
- ``serving.server``: ``python -m serving.server``, the HTTP server for load: body limit, workers.
"""
