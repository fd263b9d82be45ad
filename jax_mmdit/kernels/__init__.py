"""Hand-picked kernels for where XLA's own are slow: `onednn` (CPU matmuls on oneDNN)."""
