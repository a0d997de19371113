"""What the model costs and how far skipping can move it: analytic FLOPs and bytes
(`flops`), and the Skip-FFN / Skip-KV error bound of proofs/error_bound.md (`bound`)."""
