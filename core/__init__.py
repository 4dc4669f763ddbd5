"""kiln's ground floor: the config base, the run directory and atomic writes, JSONL and metrics I/O.

Every layer may import it; it imports nothing of the project.
"""
