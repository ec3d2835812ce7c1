"""Scoring: the served models (scorer), their registry and limits, their loading, and offline scoring."""
