"""``csc bench``: backends timed on one model (``backends``), one optimization at a time (``ablation``),
the service under HTTP load (``http``) and batch extraction (``extract``)."""
