"""Dataset, model and simulation cards (mapped from the repository top level by pyproject.toml)."""
