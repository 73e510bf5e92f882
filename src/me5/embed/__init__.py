"""Embed and search: the code that evaluation, mining and the consistency filter share."""
