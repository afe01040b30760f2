"""The divergences and the chunked kernel that computes the loss from hidden states without (B, T, V) logits."""
