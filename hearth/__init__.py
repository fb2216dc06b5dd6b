"""Hearth: an HTTP inference service for text embeddings and generated images."""

__version__ = "0.1.0"
