"""Programs and helpers that tests run beside parlour."""
