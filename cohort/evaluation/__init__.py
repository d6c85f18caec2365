"""A finished run's peers on its test split, on other data and on shifted (corrupted) data."""
