"""Where SIDs are computed and written as text: checkpoints, the float64 encoder, formatting, SID counting, and the
typed contract between the encode stage and the writer. No Ray, no stores, no output folders."""
