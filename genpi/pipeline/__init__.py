"""One pipeline for both entry points: plan -> synthesize -> train -> evaluate -> publish.

`genpi internalize` runs it in-process (`genpi.pipeline.local.LocalRunner`);
`jobs/internalize_many.py` runs it on Ray (`genpi.pipeline.ray.RayRunner`). See
docs/architecture.md.
"""
