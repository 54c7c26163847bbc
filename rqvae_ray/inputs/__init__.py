"""What a run reads: model IDs, the stores (a local hub directory or the Hugging Face Hub), the POI features and
the reader of their Pid-ordered blocks, and the demo hub."""
