"""The settings dataclasses (settings.py) and how a field becomes a command-line flag (flags.py)."""
