"""The state transitions of runs and steps: their one owner."""
