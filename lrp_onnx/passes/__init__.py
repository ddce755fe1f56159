"""Graph rewrites before and after the analysis: unfusing, KV cache, control flow, canonicalizing, remat."""
