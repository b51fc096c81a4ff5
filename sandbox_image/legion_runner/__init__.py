"""The in-container side of a Legion sandbox: ``python3 -m legion_runner``."""
