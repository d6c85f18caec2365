"""What every configuration file shares: the strict YAML reader, the ``--set`` engine and the
one-line wording of validation errors (topologies, search spaces, study files)."""
