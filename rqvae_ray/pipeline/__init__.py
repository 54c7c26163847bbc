"""The run, whatever executes it: options, the per-dataset jobs (load, check, decide per model), results, progress,
and the executor interface with the in-process executor. No Ray here."""
