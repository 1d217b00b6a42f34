"""`genpi` command line: internalize, eval, chat, inspect, serve, k8s, bench. Thin: parsing and printing only."""
from __future__ import annotations

import argparse
import logging
import os
import sys


def _common(p: argparse.ArgumentParser, overrides: bool = True) -> None:
    p.add_argument("--store", help="artifact store: a folder or an fsspec URI such as s3://bucket/genpi "
                                   "(default: the config's 'store', ./genpi-store)")
    p.add_argument("--config", help="YAML config file (sections model, engine, synth, train, eval, cluster, serve)")
    if overrides:
        p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                       help="config overrides, e.g. train.epochs=2 model.revision=0123abc")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logs, and tracebacks for bad input")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("genpi")
    except PackageNotFoundError:  # a source checkout on sys.path without an install
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="genpi", description="Internalize system prompts into LoRA adapters.",
        epilog="Exit status: 0 success; 1 some prompts failed (internalize); 2 bad input (config, manifest, "
               "model or store), nothing started. Hundreds of prompts on a Ray cluster: jobs/internalize_many.py.")
    ap.add_argument("--version", action="version", version=f"genpi {_version()}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "internalize", help="single machine, no Ray: synthesize, train, evaluate and publish a manifest's prompts",
        description="The single-machine path: every stage in this process, no Ray. The same pipeline runs as a "
                    "Ray job for many prompts on a cluster: `python jobs/internalize_many.py --manifest ...` "
                    "(or `ray job submit -- python jobs/internalize_many.py ...`).")
    p.add_argument("manifest", help="prompt file (YAML/JSONL) or a folder of them")
    p.add_argument("--force", action="store_true", help="redo prompts that are already published")
    p.add_argument("--dry-run", action="store_true", help="print the plan and its token budget, run nothing")
    _common(p)
    p = sub.add_parser("eval", help="re-evaluate a published adapter (e.g. after changing eval settings)")
    p.add_argument("prompt_id", help="the prompt id the adapter is published under")
    _common(p)
    p = sub.add_parser("chat", help="reply from the adapter, without the prompt")
    p.add_argument("prompt_id", help="the prompt id the adapter is published under")
    p.add_argument("message", help="the user message")
    p.add_argument("--max-new-tokens", type=int, default=128, help="reply length limit (default 128)")
    _common(p)
    p = sub.add_parser("inspect", help="what is published, with its metrics")
    _common(p, overrides=False)
    p = sub.add_parser("serve", help="serve every published adapter behind an OpenAI-compatible Ray Serve app")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--print-config", action="store_true",
                   help="print the Ray Serve config (YAML for `serve deploy` / a RayService) and exit")
    g.add_argument("--export-lora", action="store_true",
                   help="copy published adapters to the <uri>/<id>/ layout Ray Serve LLM (serve.backend=vllm) loads")
    _common(p)
    p = sub.add_parser("k8s", help="KubeRay manifests: regenerate k8s/, check it, or render them into a folder",
                       add_help=False)
    sub.add_parser("bench", add_help=False,
                   help="run the benchmarks of a source checkout (bench/run.py; its options follow, see --help)")
    return ap


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not verbose:
        # transformers' per-load progress bars, advice and deprecation notices drown the
        # pipeline's own progress and replies.
        import warnings

        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="peft")


def _config(args):
    from genpi.config import load_config

    cfg = load_config(args.config, getattr(args, "overrides", None))
    if args.store:
        cfg = cfg.with_overrides({"store": args.store}, "--store")
    return cfg


def _open_store(uri: str, create: bool = False):
    from genpi.store import open_store

    return open_store(uri, create=create)


def cmd_internalize(args) -> int:
    from genpi.pipeline.run import internalize

    return internalize(args.manifest, _config(args), "local", dry_run=args.dry_run, force=args.force)


def _published(store, prompt_id: str):
    fp = store.published(prompt_id)
    if fp is None:
        known = ", ".join(sorted(store.registry())) or "none"
        raise LookupError(f"no published adapter for prompt '{prompt_id}' in {store.uri} (published: {known})")
    return fp


def _spec_config(store, pdir, args):
    from genpi.config import GenpiConfig
    from genpi.manifest import PromptEntry

    spec = store.read_json(f"{pdir}/spec.json")
    cfg = GenpiConfig.model_validate(spec["config"])
    if getattr(args, "overrides", None):
        cfg = cfg.with_overrides(args.overrides, "command line")
    return PromptEntry.model_validate(spec["entry"]), cfg


def cmd_eval(args) -> int:
    from genpi.eval.report import format_eval
    from genpi.pipeline.local import LocalRunner
    from genpi.pipeline.plan import model_facts
    from genpi.pipeline.records import PromptPlan
    from genpi.pipeline.stages import publish

    store = _open_store(_config(args).store)
    fp = _published(store, args.prompt_id)
    pdir = store.prompt_dir(args.prompt_id, fp)
    entry, cfg = _spec_config(store, pdir, args)
    store.check_writable()
    p = PromptPlan(entry, cfg, fp, "unchanged")
    [(_, result, error, _)] = LocalRunner(cfg, model_facts(cfg)).evaluate([p], store, force=True)
    if error:
        print(f"genpi eval: {args.prompt_id}: evaluation failed: {error}", file=sys.stderr)
        return 1
    publish(store, p, result)  # the registry's summary follows the new eval.json
    print(format_eval(result))
    return 0


def cmd_chat(args) -> int:
    from peft import PeftModel

    from genpi.engines.base import ChatRequest
    from genpi.engines.hf import HFEngine
    from genpi.models import load_model

    store = _open_store(_config(args).store)
    fp = _published(store, args.prompt_id)
    pdir = store.prompt_dir(args.prompt_id, fp)
    _, cfg = _spec_config(store, pdir, args)
    import tempfile

    model, tok, _ = load_model(cfg.model)
    with tempfile.TemporaryDirectory() as tmp:
        model = PeftModel.from_pretrained(model, store.get_dir(f"{pdir}/adapter", tmp), adapter_name="adapter")
    engine = HFEngine(model, tok, 1)
    out = engine.generate([ChatRequest([{"role": "user", "content": args.message}], args.max_new_tokens, adapter="adapter")])
    print(out[0].text)
    return 0


def cmd_inspect(args) -> int:
    from genpi.eval.report import format_inspect

    print(format_inspect(_open_store(_config(args).store)))
    return 0


def cmd_serve(args) -> int:
    cfg = _config(args)
    if args.print_config:
        from genpi.serve.config import serve_config_yaml

        print(serve_config_yaml(cfg), end="")
        return 0
    store = _open_store(cfg.store)
    if args.export_lora:
        from genpi.serve.adapters import export_lora_layout
        from genpi.serve.config import lora_export_uri

        done = export_lora_layout(cfg)
        print(f"exported {len(done)} adapter(s) to {lora_export_uri(cfg)}: {', '.join(done) or 'all up to date'}")
        return 0
    from genpi.serve.adapters import AdapterRegistry
    from genpi.serve.lifecycle import serve_until_stopped, start

    published = [i for i, _ in AdapterRegistry(store, 0).published()]
    print(f"store {store.uri}: {len(published)} published adapter(s): {', '.join(published) or 'none yet'} "
          "(adapters published later are served without a restart)")
    url = start(cfg, blocking=False)
    print(f"serving on {url}/v1/chat/completions and {url}/v1/models; Ctrl-C stops", flush=True)
    # Ctrl-C or SIGTERM (`ray job stop`) deletes genpi's app only, not other Serve apps of
    # a shared cluster (serve.shutdown() would remove them all).
    serve_until_stopped()
    print("stopped")
    return 0


def cmd_k8s(argv: list[str]) -> int:
    from genpi.k8s import main as k8s_main

    return k8s_main(argv)


def cmd_bench(argv: list[str]) -> int:
    """`genpi bench ...` is `python bench/run.py ...` of the source checkout in the current folder:
    the benchmarks are not part of the installed package."""
    import runpy
    from pathlib import Path

    script = Path.cwd() / "bench" / "run.py"
    if not script.is_file():
        print(f"genpi bench: error: {script} not found; run it from a genpi source checkout "
              "(the benchmarks are not installed with the package)", file=sys.stderr)
        return 2
    saved, sys.argv = sys.argv, [str(script), *argv]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its options belong to bench/run.py, not to this parser
        return cmd_bench(argv[1:])
    if argv[:1] == ["k8s"]:  # its options (and --help) belong to genpi.k8s
        return cmd_k8s(argv[1:])
    ap = build_parser()
    # argparse fills the positional `overrides` only in the first run of positionals, so
    # `internalize m.yaml --store s train.epochs=3` would reject the override: take the
    # leftover positionals after options as overrides too (in order).
    args, extra = ap.parse_known_args(argv)
    if extra:
        if getattr(args, "overrides", None) is None or any(x.startswith("-") for x in extra):
            ap.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    _setup_logging(args.verbose)
    from genpi.errors import INPUT_ERRORS

    commands = {"internalize": cmd_internalize, "eval": cmd_eval, "chat": cmd_chat, "inspect": cmd_inspect,
                "serve": cmd_serve}
    try:
        return commands[args.cmd](args)
    except INPUT_ERRORS as e:
        # Input problems get a message, not a traceback (use -v for one).
        if args.verbose:
            raise
        print(f"genpi {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
