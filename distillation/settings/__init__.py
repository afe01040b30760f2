"""The config: its schema, defaults and checks, read once from the YAML file. Imports only the base layer; no torch."""
