"""Engines and backend-agnostic pipelines for serving JanusFlow."""
