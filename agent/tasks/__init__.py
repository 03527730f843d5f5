"""One task's life on the agent: runner, journal, workspace."""
