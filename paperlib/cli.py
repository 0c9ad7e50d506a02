"""The ``paperlib`` command: list / run / reproduce / env / bench.

    paperlib list                              notebooks, presets and what each produces
    paperlib run 01_datasets --preset smoke    one notebook in compute mode (papermill)
    paperlib run 02_quality --preset quick -p seeds '[1, 2]'
    paperlib reproduce --preset quick          every notebook, then re-render the committed ones
    paperlib env                               versions, device, data found
    paperlib bench metrics|scan|train-step     cost benchmarks (print figures)

Spreading a study (``paperlib.distributed``):

    paperlib run 02_quality --preset paper --nproc 4       every run on 4 processes (torchrun, DDP)
    paperlib run 02_quality --preset paper --shard 2/8     the second of 8 shards of the runs
    paperlib merge 02_quality --preset paper              the shards' partial results -> one JSON
    torchrun --nproc_per_node 4 -m paperlib.cli compute 02_quality --preset paper   (what --nproc runs)
"""

from __future__ import annotations

import argparse
import inspect
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from paperlib import distributed, paths, results
from paperlib.config import COMMITTED_PRESET, PRESETS, ConfigError, load_preset, merge
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
    if args.nproc != 1 or args.shard:
        return _run_spread(args, overrides)
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


def _spreadable(notebook: str):
    """The study of ``notebook`` if it can be spread over processes and shards (its ``compute``
    takes a ``shard``); else a clear error."""
    study = get_study(notebook)
    if "shard" not in inspect.signature(study.compute).parameters:
        spread = [s.notebook for s in studies().values() if "shard" in inspect.signature(s.compute).parameters]
        raise ConfigError(f"{study.notebook} cannot be spread over processes or shards (--nproc, --shard); "
                          f"studies that can: {', '.join(spread)}")
    return study


def _run_spread(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    """``run --nproc N`` and/or ``run --shard i/n``: compute without papermill (under torchrun when
    N > 1), then draw the figures from the results by rendering the notebook; a shard's partial
    results wait for ``paperlib merge`` instead."""
    study = _spreadable(args.notebook)
    if args.nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {args.nproc}")
    if args.render:
        raise ConfigError("--render draws from existing results; it does not combine with --nproc or --shard")
    shard = distributed.Shard.parse(args.shard) if args.shard else None
    compute = ["compute", study.notebook, "--preset", args.preset, "--output-dir", args.output_dir]
    compute += [x for name, value in (args.param or []) for x in ("-p", name, value)]
    compute += ["--shard", args.shard] if args.shard else []
    if args.nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                  "-m", "paperlib.cli", *compute]
        print("launching: " + " ".join(launch[1:]), flush=True)
        code = subprocess.run(launch).returncode
        if code != 0:
            print(f"paperlib: error: the {args.nproc} processes failed (exit status {code}); see their output above",
                  file=sys.stderr)
            return code
    else:
        cmd_compute(build_parser().parse_args(compute))
    if shard is not None:
        path = results.partial_results_path(study.name, args.preset, shard.label, args.output_dir or None)
        print(f"partial results of shard {shard.index}/{shard.count}: {path}")
        print(f"when every shard is done: paperlib merge {study.notebook} --preset {args.preset}"
              + (f" --output-dir {args.output_dir}" if args.output_dir else ""))
        return 0
    start = time.time()
    out = execute(study.notebook, args.preset, overrides, recompute=False, output_dir=args.output_dir)
    print(f"rendered notebook: {out}")
    for p in _written_since(start, paths.figures_dir(args.output_dir)):
        print(f"  wrote {p}")
    return 0


def cmd_compute(args: argparse.Namespace) -> int:
    """Compute a study's results without papermill: what ``run --nproc`` starts on every process
    (under torchrun it joins the process group first; only rank 0 writes)."""
    study = _spreadable(args.notebook)
    overrides = {name: _parse_value(value) for name, value in (args.param or [])}
    overrides["recompute"] = True
    if args.output_dir:
        overrides["output_dir"] = str(Path(args.output_dir).resolve())
    cfg = merge(study.params, study.notebook, args.preset, overrides)  # fails loudly before running
    shard = distributed.Shard.parse(args.shard) if args.shard else None
    if distributed.launched_by_torchrun():
        distributed.init_from_env()
    try:
        study.compute(cfg, shard=shard)
    finally:
        distributed.destroy()
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Combine every shard's partial results into the study's results JSON (see
    :func:`paperlib.distributed.merge_partials` for what is refused)."""
    study = get_study(args.notebook)
    output_dir = str(Path(args.output_dir).resolve()) if args.output_dir else ""
    files = [Path(f) for f in args.files] or results.find_partial_results(study.name, args.preset, output_dir or None)
    if not files:
        raise ConfigError(f"no partial results of {study.notebook} ({args.preset}) in "
                          f"{results.partials_dir(output_dir or None)}: compute them with paperlib run "
                          f"{study.notebook} --preset {args.preset} --shard i/n (or name the files)")
    docs = [results.load_partial_results(f) for f in files]
    for doc, f in zip(docs, files):
        if (doc["study"], doc["preset"]) != (study.name, args.preset):
            raise ConfigError(f"{f} holds study {doc['study']!r} preset {doc['preset']!r}, not "
                              f"{study.name!r} preset {args.preset!r}")
    merged = distributed.merge_partials(docs, [str(f) for f in files])
    params = {**merged["params"], "output_dir": output_dir}
    walls = [d["provenance"].get("wall_seconds") or 0.0 for d in docs]
    starts = [d["provenance"].get("started") for d in docs if d["provenance"].get("started")]
    path = results.save_results(study.name, args.preset, params, merged["results"], output_dir=output_dir or None,
                                wall_seconds=sum(walls), started=min(starts) if starts else None,
                                extra_provenance={"merged_from": merged["shards"]})
    if study.check is not None:
        study.check(results.load_results(study.name, args.preset, output_dir or None))
    print(f"merged {len(files)} shards ({len(merged['results'].get('runs', []))} runs) into {path}")
    if args.render:
        out = execute(study.notebook, args.preset, {}, recompute=False, output_dir=output_dir)
        print(f"rendered notebook: {out}")
    else:
        print(f"figures: paperlib run {study.notebook} --preset {args.preset} --render"
              + (f" --output-dir {args.output_dir}" if args.output_dir else ""))
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

    fn = bench.BENCHMARKS.get(args.name)
    if fn is None:
        raise ConfigError(f"unknown benchmark {args.name!r}: choose one of {', '.join(bench.BENCHMARKS)}")
    fn(None)
    return 0


def cmd_ties(args: argparse.Namespace) -> int:
    from paperlib.studies import quality_ties

    cfg = quality_ties.TieProbeParams(inter=args.inter, seeds=tuple(args.seeds), epochs=args.epochs,
                                      model=args.model, device=args.device, output_dir=args.output_dir,
                                      note=args.note, variants=tuple(args.orders or quality_ties.VARIANTS))
    doc = quality_ties.compute(cfg)
    print(quality_ties.table(doc).to_string())
    print(quality_ties.summary(doc))
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
    run.add_argument("--nproc", type=int, default=1, metavar="N",
                     help="train every run on N processes (torchrun, DistributedDataParallel; one GPU each)")
    run.add_argument("--shard", default="", metavar="I/N",
                     help="compute only shard I of N of the study's runs (partial results, see merge)")
    run.set_defaults(fn=cmd_run)

    comp = sub.add_parser("compute", help="compute a study's results without papermill (torchrun starts this)")
    comp.add_argument("notebook")
    comp.add_argument("--preset", default="smoke", help=f"one of {', '.join(PRESETS)} (default smoke)")
    comp.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"))
    comp.add_argument("--output-dir", default="")
    comp.add_argument("--shard", default="", metavar="I/N")
    comp.set_defaults(fn=cmd_compute)

    mrg = sub.add_parser("merge", help="combine the partial results of every shard into the results JSON")
    mrg.add_argument("notebook")
    mrg.add_argument("--preset", default="smoke", help=f"one of {', '.join(PRESETS)} (default smoke)")
    mrg.add_argument("--output-dir", default="", help="the results folder's parent, as given to run")
    mrg.add_argument("--render", action="store_true", help="then draw the figures (render the notebook)")
    mrg.add_argument("--files", nargs="+", default=[], metavar="FILE",
                     help="partial results files to merge (default: every one in results/shards/ of the output dir)")
    mrg.set_defaults(fn=cmd_merge)

    rep = sub.add_parser("reproduce", help="run every notebook, then re-render the committed ones")
    rep.add_argument("--preset", default=COMMITTED_PRESET, help=f"one of {', '.join(PRESETS)} (default {COMMITTED_PRESET})")
    rep.add_argument("--output-dir", default="")
    rep.add_argument("--no-render", action="store_true", help="do not re-render the committed notebooks")
    rep.add_argument("notebooks", nargs="*", help="only these notebooks (default: all, in order)")
    rep.set_defaults(fn=cmd_reproduce)

    sub.add_parser("env", help="versions, device and the data found").set_defaults(fn=cmd_env)

    b = sub.add_parser("bench", help="cost benchmarks that print figures")
    b.add_argument("name", help="metrics, scan, train-step, scaling, streaming or ddp")
    b.set_defaults(fn=cmd_bench)

    t = sub.add_parser("ties", help="ML-1M's tied ratings: train on RecBole's order (float32 time), exact time "
                                    "order, the copy's and shuffled ties (02_quality shows the results)")
    t.add_argument("inter", help="RecBole ml-1m.inter with a timestamp field (the whole file or its first users)")
    t.add_argument("--seeds", type=int, nargs="+", default=[2020])
    t.add_argument("--orders", nargs="+", default=None,
                   help="orders to train on (default all): recbole, file, copy, shuffled")
    t.add_argument("--epochs", type=int, default=300, help="maximum epochs (early stopping, patience 10)")
    t.add_argument("--model", default="mamba4rec")
    t.add_argument("--device", default="cpu")
    t.add_argument("--output-dir", default="", help="write results/ here instead of figures/")
    t.add_argument("--note", default="", help="where the .inter file came from, shown with the results")
    t.set_defaults(fn=cmd_ties)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, FileNotFoundError, ValueError, distributed.DistributedError) as exc:
        print(f"paperlib: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
