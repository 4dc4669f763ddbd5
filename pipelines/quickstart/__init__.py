"""The quickstart: a deterministic corpus and a task a program can check."""
