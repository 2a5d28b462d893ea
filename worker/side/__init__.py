"""Consumers beside the pipeline (interactions into user profiles), each exactly once like it."""
