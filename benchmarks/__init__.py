"""CPU benchmarks of lightning_veripo against the libraries users would otherwise reach for (see README.md).

A package, so the scripts share `benchmarks.harness` and read each other as modules; each still runs as
`python benchmarks/NAME.py` or `python -m benchmarks.NAME`."""
