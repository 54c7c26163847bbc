"""The Python API: the original system's batch-inference classes and the in-process model."""
