"""Benchmarks: `python -m bench.train_speed` times the library's trainer against a plain diffusers + peft loop."""
