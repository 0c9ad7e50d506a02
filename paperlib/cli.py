"""The ``paperlib`` command: list / run / reproduce / env / bench.

    paperlib list                              notebooks, presets and what each produces
    paperlib run 01_datasets --preset smoke    one notebook in compute mode (papermill)
    paperlib run 02_quality --preset quick -p seeds '[1, 2]'
    paperlib reproduce --preset quick          every notebook, then re-render the committed ones
    paperlib env                               versions, device, data found
    paperlib bench metrics|scan|train-step     cost benchmarks (print figures)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from paperlib import paths
from paperlib.config import COMMITTED_PRESET, PRESETS, ConfigError, load_preset
from paperlib.notebooks import execute, render_committed
from paperlib.studies import get_study, studies


def _parse_value(text: str) -> Any:
    """``-p name value``: the value is read as YAML, so ``3`` is an int, ``0.5`` a float,
    ``[a, b]`` a list and ``true`` a bool (papermill's own ``-p`` would guess, PITFALLS #4)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot read parameter value {text!r} as YAML: {exc}") from exc


def cmd_list(args: argparse.Namespace) -> int:
    registry = studies()
    print("Notebooks (paperlib run NAME --preset P):")
    for study in registry.values():
        print(f"  {study.notebook:<16} {study.title}")
        print(f"  {'':<16} results: figures/results/{study.name}.<preset>.json")
        print(f"  {'':<16} produces: {', '.join(study.produces)} (png/pdf or md/tex/csv)")
    print(f"\nPresets (the notebooks' defaults are {COMMITTED_PRESET!r}; the others change):")
    for p in PRESETS:
        parts = [f"{s.notebook}: {load_preset(p, s.notebook) or 'defaults'}" for s in registry.values()]
        print(f"  {p:<8} " + "; ".join(parts))
    return 0


def _written_since(start: float, root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.stat().st_mtime >= start)


def cmd_run(args: argparse.Namespace) -> int:
    overrides = {name: _parse_value(value) for name, value in (args.param or [])}
    if args.log_output:  # papermill streams the kernel's output through its logger
        import logging

        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logging.getLogger("papermill").addHandler(handler)
        logging.getLogger("papermill").setLevel(logging.INFO)
    start = time.time()
    out = execute(args.notebook, args.preset, overrides, recompute=not args.render, output_dir=args.output_dir,
                  log_output=args.log_output)
    print(f"executed notebook: {out}")
    for p in _written_since(start, paths.figures_dir(args.output_dir)):
        print(f"  wrote {p}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    start = time.time()
    names = [get_study(n).notebook for n in args.notebooks] if args.notebooks else list(studies())
    timings: list[tuple[str, float, Path]] = []
    for name in tqdm(names, desc=f"reproduce ({args.preset})", unit="notebook"):
        t0 = time.perf_counter()
        executed = execute(name, args.preset, recompute=True, output_dir=args.output_dir, progress=False)
        timings.append((name, time.perf_counter() - t0, executed))
    rendered: list[Path] = []
    if args.preset == COMMITTED_PRESET and not args.output_dir and not args.no_render:
        for name in tqdm(names, desc="re-render committed notebooks", unit="notebook"):
            rendered.append(render_committed(name))
    print("\nSummary")
    for name, secs, executed in timings:
        print(f"  {name:<16} computed in {secs:7.1f} s -> {executed}")
    for p in rendered:
        print(f"  re-rendered {p}")
    if args.preset != COMMITTED_PRESET:
        print(f"  (committed notebooks render the {COMMITTED_PRESET!r} preset; executed copies are in build/notebooks/)")
    for p in _written_since(start, paths.figures_dir(args.output_dir)):
        print(f"  wrote {p}")
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    from paperlib.data import DATASETS
    from paperlib.results import provenance

    prov = provenance()
    print(f"paperlib {prov['paperlib']}  python {prov['python']}  git {prov['git_commit'] or '-'}"
          f"{' (dirty)' if prov['git_dirty'] else ''}")
    for pkg, ver in prov["versions"].items():
        print(f"  {pkg:<13} {ver or 'not installed'}")
    dev = prov["device"]
    print(f"device: {dev['processor']}, {dev['cpu_count']} CPUs, torch threads {dev['torch_threads']}, "
          f"CUDA {'yes: ' + dev.get('gpu', '') if dev['cuda'] else 'no'}")
    from paperlib.models.scan import available_backends

    print(f"selective-scan backends: {', '.join(available_backends())}")
    print(f"PAPERLIB_DATA: {paths.data_dir() or '(not set)'}   cache: {paths.cache_dir()}")
    from paperlib.data import locate

    for name in DATASETS:
        try:
            found = locate(name, download=False)
            print(f"  {name:<20} {found}")
        except Exception as exc:  # noqa: BLE001 - report, don't fail
            print(f"  {name:<20} not found locally ({str(exc).splitlines()[0]})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from paperlib import bench

    fn = getattr(bench, "bench_" + args.name.replace("-", "_"), None)
    if fn is None:
        names = sorted(n[6:].replace("_", "-") for n in dir(bench) if n.startswith("bench_"))
        raise ConfigError(f"unknown benchmark {args.name!r}: choose one of {', '.join(names)}")
    fn()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paperlib", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="notebooks, presets and what each produces").set_defaults(fn=cmd_list)

    run = sub.add_parser("run", help="run one notebook in compute mode through papermill")
    run.add_argument("notebook", help="e.g. 01_datasets (or the study name, datasets)")
    run.add_argument("--preset", default="smoke", help=f"one of {', '.join(PRESETS)} (default smoke)")
    run.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"),
                     help="override a parameter; VALUE is YAML (3, 0.5, [a, b], true)")
    run.add_argument("--output-dir", default="", help="write figures/tables/results here instead of figures/")
    run.add_argument("--render", action="store_true", help="render from existing results instead of computing")
    run.add_argument("--log-output", action="store_true", help="stream the notebook's output (one line per epoch) here")
    run.set_defaults(fn=cmd_run)

    rep = sub.add_parser("reproduce", help="run every notebook, then re-render the committed ones")
    rep.add_argument("--preset", default=COMMITTED_PRESET, help=f"one of {', '.join(PRESETS)} (default {COMMITTED_PRESET})")
    rep.add_argument("--output-dir", default="")
    rep.add_argument("--no-render", action="store_true", help="do not re-render the committed notebooks")
    rep.add_argument("notebooks", nargs="*", help="only these notebooks (default: all, in order)")
    rep.set_defaults(fn=cmd_reproduce)

    sub.add_parser("env", help="versions, device and the data found").set_defaults(fn=cmd_env)

    b = sub.add_parser("bench", help="cost benchmarks that print figures")
    b.add_argument("name", help="metrics, scan or train-step")
    b.set_defaults(fn=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"paperlib: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
