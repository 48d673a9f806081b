"""MLflow tracking: the store, runs with tables and plots, the model registry and its aliases."""
