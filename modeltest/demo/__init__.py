"""Offline demo and test fixtures: a tiny random Qwen2-VL with the real Qwen2 tokenizer, and
small TextVQA- and VideoBench-format datasets, all built from a fixed seed."""
