"""parlour test suite."""
