"""Where rows are ordered and files are published: the output layout, staging, the manifest, resume state,
kept rows (``--keep-existing``), the per-model sinks, exports, the dataset writer and the Hub upload."""
