"""make testbed: scenarios, modes, the runner, statistics and reports."""
