"""The run configuration: its schema, YAML files and overrides."""
