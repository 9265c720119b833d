"""What this machine computes fast (matmul peaks, the bf16 probe) and the cache of those
measurements."""
