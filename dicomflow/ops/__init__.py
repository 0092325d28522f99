"""Operator tools: the CLI, status, the status page and tables. Not deployed with the functions."""
