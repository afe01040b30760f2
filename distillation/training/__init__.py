"""The training loop, its evaluation, samples and the teacher cache."""
