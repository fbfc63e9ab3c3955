"""The `parlour` command: serve and keys (main), bots and knowledge bases (admin), chat."""
