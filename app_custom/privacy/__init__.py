"""Privacy of the slow deltas: clipping and Gaussian noise (DP), per-device accounting, fixed-point
quantization into a modular ring, and secure aggregation (pairwise and self masks, dropout recovery)."""
