"""The model: GGUF headers (local or over HTTP), architectures, quant rules and recipes, the catalog, synthetic models, the one model resolver, quality estimates."""
