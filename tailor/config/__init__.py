"""Settings: the validated configuration schema and the bundled profiles (profiles/*.yaml)."""
