"""Custom GPU kernels of the serving engine (Triton). Each module imports triton only when a kernel runs."""
