"""Native RG-LRU kernels: C (CPU, built at install), Triton (CUDA), Metal (MPS)."""
