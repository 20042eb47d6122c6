"""MLflow: tracking runs and the model registry's promotion gate."""
