"""Commands around the worker: demo, evaluate, produce, replay and the embedded dev stack."""
