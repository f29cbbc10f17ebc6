"""Test helpers for deltahub: a local Hugging Face Hub-compatible server and pytest fixtures.

Only the standard library is needed to import :mod:`deltahub.testing.hub_server`; the pytest
fixtures in :mod:`deltahub.testing.fixtures` import ``pytest`` (and ``huggingface_hub`` lazily).
"""
