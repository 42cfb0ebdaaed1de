"""Ways to start a pipeline stage other than a local process: ``kubernetes`` (one Job per stage)."""
