"""Model runtimes behind one small contract (see base.Backend)."""
