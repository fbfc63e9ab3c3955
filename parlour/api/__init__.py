"""The HTTP edges: one module per dialect, each translating its wire format to the engine."""
