"""llm-gateway: one server for many self-hosted LLMs, configured by models.yaml."""

__version__ = "0.1.0"
