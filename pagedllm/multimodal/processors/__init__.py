"""Processor adapters, one per multi-modal family (registered in multimodal/registry.py)."""
