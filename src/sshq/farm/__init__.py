"""The task farm."""
