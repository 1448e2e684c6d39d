"""The coprocessor method (arXiv 2412.17747) as a plain PyTorch + transformers library.

Imports nothing from Django: the registry, the jobs and the router all stand on it.
"""
