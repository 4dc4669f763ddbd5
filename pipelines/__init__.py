"""kiln's stage drivers, one subpackage per stage family, with the CLI, the config root and the report on top."""
