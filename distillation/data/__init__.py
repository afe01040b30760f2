"""Data files, chat conversations and batching: what turns the data set into padded batches."""
