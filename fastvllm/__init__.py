"""fastvllm: snapshot a ready vLLM server with CRIU and restore it in seconds."""

__version__ = "0.1.0"
