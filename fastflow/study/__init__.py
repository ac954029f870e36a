"""Study: sweeps (storage, recovery of dead trials, the runner, the summary), search spaces, paper runs, the report.
May import every layer below: runtime, data, core, engine, pages and tracking."""
