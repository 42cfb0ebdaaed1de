"""Hand-written kernels of the serving engine (paged attention, 4-bit GEMM), each with a torch path beside it."""
