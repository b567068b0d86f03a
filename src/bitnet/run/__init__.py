"""The run directory and the checkpoint format: the ground floor that train, generation, export and status
stand on (docs/design.md, "run directory" and "checkpoint format").

Standard library and torch only; nothing here imports bitnet.train, model, data or instrumentation.
`layout` and `jsonl` are standard library only (status, a stdlib-only tool, reads through them), so
this file imports nothing: import the submodules directly.
"""
