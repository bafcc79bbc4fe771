"""The MLflow model registry: register a new version (@challenger), promote it past the champion gate."""
