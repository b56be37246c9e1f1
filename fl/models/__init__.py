"""Model files (the README's model-file contract) used by the FL experiments."""
