"""A small GPT trained from scratch on text that ships with Python, split into pipeline stages.

Imports torch; nothing under idlegrid.core imports this package.
"""
