"""The window's tabs: each owns its views and its handling of its job's records."""
