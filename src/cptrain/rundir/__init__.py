"""The run directory: one reader and writer of what a run leaves on disk (``RunDir``), its
file names (``layout``) and its typed, versioned summary (``summary``)."""
