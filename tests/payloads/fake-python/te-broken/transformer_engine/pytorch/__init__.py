raise AttributeError("module 'transformer_engine' has no attribute 'pytorch'")
