"""Lightning callbacks of lightning_veripo (shipped as `lightning_veripo.callbacks`)."""

from lightning_veripo.callbacks.verifier import VerifierCallback

__all__ = ["VerifierCallback"]
