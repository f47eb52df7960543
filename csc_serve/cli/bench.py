"""``csc bench``: throughput, latency and FLOP rate of every backend against eager PyTorch."""

from __future__ import annotations

import argparse

from csc_serve.bench.extract import add_extract_arguments
from csc_serve.bench.http import add_http_arguments
from csc_serve.cli.common import MODEL_HELP


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _bench(args: argparse.Namespace) -> None:
    models = args.model or ["csc-ctrl-rgb"]
    if len(models) > 1 and (args.http is not None or args.extract is not None or args.artifacts):
        raise ValueError("several models are compared on the backends only: drop --http, --extract and --artifacts")
    args.model = models[0] if len(models) == 1 else models
    if args.http is not None:  # the HTTP service under load, not the backends
        from csc_serve.bench.http import run_from_args

        return run_from_args(args)
    if args.extract is not None:  # csc extract end to end, not the backends alone
        from csc_serve.bench.extract import run_from_args as run_extract_bench

        return run_extract_bench(args)
    from csc_serve.bench.backends import CALLS, format_table, run_bench
    from csc_serve.bench.timing import write_report

    unknown = sorted(set(args.calls) - set(CALLS))
    if unknown:
        raise ValueError(f"unknown call(s) {unknown}; choose from {', '.join(CALLS)}")
    reports = [run_bench(_config(args, model)) for model in models]
    for report in reports:
        if len(reports) > 1:
            print(f"== {report['model']['source']}")
        print(format_table(report))
    if len(reports) == 1:
        write_report(reports[0], args.json)
    else:
        from csc_serve.bench.compare import compare_reports, format_comparison

        comparison = compare_reports(reports)
        print(format_comparison(comparison))
        write_report({"models": reports, "comparison": comparison}, args.json)
    print(f"results: {args.json}")


def _config(args: argparse.Namespace, model: str):
    from csc_serve.bench.backends import BenchConfig

    return BenchConfig(
        model=model,
        backends=args.backends,
        batches=args.batches,
        sizes=args.sizes,
        calls=args.calls,
        scaling_sizes=args.scaling_sizes if args.scaling else (),
        min_time=args.min_time,
        threads=args.threads,
        data=args.data,
        artifacts=args.artifacts,
        ablation=args.ablation,
    )


def add_bench(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "bench",
        help="benchmark every available backend against eager PyTorch",
        description="Time encode, decode and reconstruct on every available backend (eager PyTorch is the "
        "baseline; add torch-compiled, torch-bfloat16, torch-cuda... with --backends) on the same inputs, "
        "for each batch size and image size: latency, images/s, convolution FLOPs per pixel (counted from the "
        "model config) and GFLOP/s against the float32 matmul peak measured in the same run, reconstruction "
        "PSNR; then encode time against pixel count with a linear fit. Prints a table and writes JSON.",
    )
    p.add_argument("model", metavar="MODEL", nargs="*",
                   help=f"{MODEL_HELP}; several: each runs the same cases in turn, then their times side by side "
                   "(default: csc-ctrl-rgb)")
    p.add_argument("--backends", type=_name_list, default=(),
                   help="comma-separated: torch-eager, torch-compiled, torch-bfloat16, onnxruntime-cpu, "
                   "onnxruntime-cuda, tensorrt, torch-cuda, torch-cuda-compiled, torch-cuda-bfloat16 "
                   "(default: eager torch and every available exported-graph backend)")
    p.add_argument("--batches", type=_int_list, default=(1, 8, 32), help="batch sizes (default: 1,8,32)")
    p.add_argument("--sizes", type=_int_list, default=(64, 256), help="square image sizes (default: 64,256)")
    p.add_argument("--calls", type=_name_list, default=("encode", "decode", "reconstruct"),
                   help="calls to time (default: encode,decode,reconstruct)")
    p.add_argument("--scaling-sizes", type=_int_list, default=(64, 128, 256, 512, 768, 1024),
                   help="image sizes of the time-against-pixels fit (encode, batch 1, fastest backend; "
                   "default: 64,128,256,512,768,1024)")
    p.add_argument("--no-scaling", dest="scaling", action="store_false", help="skip the pixel-count fit")
    p.add_argument("--min-time", type=float, default=1.0,
                   help="seconds of timed calls per case, at least 2 calls (default: 1.0)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: every usable core)")
    p.add_argument("--data", default=None, help="folder of images to crop inputs from (default: synthetic images)")
    p.add_argument("--artifacts", default=None, help="'csc export' directory (default: exported to the cache)")
    p.add_argument("--ablation", action="store_true",
                   help="also time encode at the largest batch and smallest size one optimization at a time")
    p.add_argument("--json", default="bench.json", help="where to write the results (default: bench.json)")
    add_http_arguments(p)
    add_extract_arguments(p)
    p.set_defaults(run=_bench)
