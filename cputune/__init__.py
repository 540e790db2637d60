"""cputune: measure a CPU box, predict llama.cpp speed on it, and run llama.cpp tuned for it."""

__version__ = "0.1.0"
