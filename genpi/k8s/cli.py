"""`genpi k8s` / `python -m genpi.k8s`: write, check or render the KubeRay manifest tree."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import genpi.k8s.output as output

USAGE_EPILOG = """\
examples:
  genpi k8s --render my-k8s                   # anywhere: write base/ and overlays/ into my-k8s/
  genpi k8s --render my-k8s --config gpu=my-gpu.yaml --prompts my-prompts/
  kubectl apply -n genpi -k my-k8s/overlays/gpu-prod
  genpi k8s                                   # in a checkout: rewrite the repository's k8s/
  genpi k8s --check                           # in a checkout: exit 1 while k8s/ is stale
"""


def find_checkout(start: Path) -> Path | None:
    """The genpi source checkout holding `start` (a folder with genpi's pyproject.toml and k8s/)."""
    for folder in (start, *start.parents):
        pyproject = folder / "pyproject.toml"
        if (folder / "k8s").is_dir() and pyproject.is_file() and 'name = "genpi"' in pyproject.read_text(encoding="utf-8"):
            return folder
    return None


def _config_arg(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE (e.g. gpu=my-gpu.yaml), got '{text}'")
    return name, Path(path)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="genpi k8s", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=USAGE_EPILOG,
        description="Generate the KubeRay manifests (RayJob, RayService, RayCluster, ConfigMaps; a base and "
                    "the dev-cpu and gpu-prod overlays) from the profiles and configs packaged with genpi.")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true",
                   help="exit 1 and name the stale files when the checkout's k8s/ differs from what would be generated")
    g.add_argument("--render", metavar="DIR", type=Path,
                   help="write the whole manifest tree (base/, overlays/) into DIR; works outside a checkout")
    ap.add_argument("--config", metavar="NAME=FILE", type=_config_arg, action="append", default=[],
                    help="with --render: use FILE instead of the packaged genpi config NAME (cpu-dev or gpu); repeatable")
    ap.add_argument("--prompts", metavar="PATH", type=Path,
                    help="with --render: the manifest file or folder for the genpi-prompts ConfigMap "
                         "(default: one packaged example prompt, 'french')")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if (args.config or args.prompts) and not args.render:
        # The repository's k8s/ is always what the packaged data gives, so that --check means one thing.
        ap.error("--config and --prompts go with --render DIR")
    try:
        files = output.generate(dict(args.config), args.prompts)
    except (ValueError, OSError, RuntimeError) as e:  # ConfigError is a ValueError: it names the file and field
        print(f"genpi k8s: {e}", file=sys.stderr)
        return 2
    if args.render:
        written = output.write_tree(args.render, files)
        stale = output.stale_files(args.render, files)
        print(f"wrote {len(written)} file(s) under {args.render}/ ({len(files)} generated)")
        if stale:  # only YAML files that were there before and that genpi does not generate
            print(f"note: {args.render}/ also holds files genpi does not generate: {', '.join(stale)}", file=sys.stderr)
        return 0
    checkout = find_checkout(Path.cwd())
    if checkout is None:
        print("genpi k8s: not inside a genpi checkout (no pyproject.toml and k8s/ above the current folder); "
              "use --render DIR to write the manifests anywhere", file=sys.stderr)
        return 2
    k8s_dir = checkout / "k8s"
    if args.check:
        stale = output.stale_files(k8s_dir, files)
        if stale:
            print(f"{k8s_dir}/ is stale (run `genpi k8s`): " + ", ".join(stale), file=sys.stderr)
            return 1
        print(f"{k8s_dir}/ is up to date")
        return 0
    written = output.write_tree(k8s_dir, files)
    print(f"wrote {len(written)} file(s) under {k8s_dir}/: {', '.join(written) or 'all up to date'}")
    return 0
