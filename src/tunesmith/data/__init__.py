"""Data stage: formats, validation, splitting, chat templates."""
