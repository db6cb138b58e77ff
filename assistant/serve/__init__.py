"""Serving through vLLM: the out-of-tree model and processor, the /v1/inspect route and `anomaly-assistant serve`.

Everything that imports vLLM stays in this package and is imported only inside vLLM's processes (or the
serving venv), so the main installation never needs vLLM.
"""
