"""MLflow: the tracker (the driver is its one writer), peers as MLflow models, ONNX files."""
