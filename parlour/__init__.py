"""parlour: a self-hosted chat server for language models with server-side memory."""

__version__ = "0.1.0"
