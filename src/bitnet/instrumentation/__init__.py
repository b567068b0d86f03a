"""Instrumentation: hooks the training loop calls at named points, and the run directory's writers.

Nothing here imports the loop; the loop builds a plain list of hooks and calls them in order.
"""
