"""Causal-LM LoRA: the same config-driven trainer for language models (`task: llm`), with peft's adapter format.

config -> data (files, formats, templates, tokens) -> model (base, LoRA, adapter folders) -> loop -> generate.
"""
