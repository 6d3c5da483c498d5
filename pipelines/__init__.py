"""The Kubeflow pipeline that wires the components (see deepsc_pipeline.py)."""
