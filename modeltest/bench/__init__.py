"""`modeltest bench`: the same workload through the engine and transformers' generate, in one process."""
