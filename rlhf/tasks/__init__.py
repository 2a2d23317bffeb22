"""Shipped offline tasks: data generators with their gold annotators."""
