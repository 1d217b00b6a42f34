"""KubeRay manifests for genpi, generated from data packaged with genpi (so `genpi k8s` works
from an installed wheel as well as from a checkout):

    profiles.yaml      deployment profiles: head size, worker shape, scaling, TTLs, image tag
    configs/*.yaml     the genpi config each profile runs with (cluster/configs/ links here)
    prompts/           the default prompts of the genpi-prompts ConfigMap (one small example)
    profiles.py        reads those; versions from package metadata; pod sizes from the config
    builders.py        RayJob, RayService, RayCluster, ConfigMaps, overlay patches
    output.py          YAML text of the whole tree; write it into a folder or check one
    cli.py             `genpi k8s` / `python -m genpi.k8s`

The RayService's serveConfigV2 is `genpi.serve.config.serve_config` of the same config the
RayJob runs with (the function behind `genpi serve --print-config`), so the two cannot drift.
No Ray import here.
"""
from genpi.k8s.cli import main

__all__ = ["main"]
