"""Device, precision and processes, through Hugging Face Accelerate."""
