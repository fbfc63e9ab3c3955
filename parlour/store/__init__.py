"""Persistence: tables, queries and migrations shared by every dialect."""
