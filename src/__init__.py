"""keyetron: a parallelism-first training stack for Keye-VL-1.5-style video MLLMs."""
__version__ = "0.1.0"
