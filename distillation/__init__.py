"""The layers of the distillation script, lowest first: base, settings, data, kernels, (the root modules
dataset, loss, models), runtime, run, training; distill.py at the top. Each imports only from layers below it."""
