"""Lightning callbacks of lightning_veripo (installed as `lightning_veripo.callbacks`)."""
