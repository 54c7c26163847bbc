"""The command line: the app, the console and its progress, the summary table, the quality report, ``diff``."""
