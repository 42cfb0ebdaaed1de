"""Hand-written Triton kernels of the serving engine (paged attention, W4A16 GEMV), each with a torch reference
beside it. Each module imports triton only when a kernel runs."""
