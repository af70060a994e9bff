"""RoPE implementations and adapters compared by the parity suite, and the float64 oracle."""
