"""`dsat`: the command line. Each command is a thin layer over the functions the flows call.

Commands that run Prefect flows (`refresh`, `import`, `demo`) live here rather than in `dsat_core`, which
never imports Prefect; every other command calls `dsat_core` directly.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path


def _bbox(text: str) -> tuple[float, float, float, float]:
    values = [float(v) for v in text.split(",")]
    if len(values) != 4:
        raise argparse.ArgumentTypeError("bbox is 'lon_min,lat_min,lon_max,lat_max'")
    return tuple(values)  # type: ignore[return-value]


def _cmd_ingest(args: argparse.Namespace) -> int:
    from dsat_core.data.catalog import load_catalog
    from dsat_core.data.ingest import ingest_items, ingest_report_markdown
    from dsat_core.data.stac import search_items
    from dsat_core.data.stac_server import catalog_api

    config = load_catalog(args.catalog).with_overrides(stac_api=args.stac_api)
    with catalog_api(config) as url:  # a static_catalog is served while the search runs
        items = search_items(
            config, api_url=url, bbox=args.bbox, datetime=args.datetime, max_items=args.max_items
        )
    report = ingest_items(
        items,
        config,
        args.store,
        aoi_bbox=args.bbox,
        scheduler_address=args.dask_address,
        n_workers=args.workers,
        progress=True,
    )
    print(ingest_report_markdown(report))
    return 0


def _cmd_refresh(args: argparse.Namespace) -> int:
    from flows.refresh_dataset import RefreshParams, refresh_dataset

    params = RefreshParams(
        catalog=args.catalog,
        store_uri=args.store,
        stac_api=args.stac_api,
        bbox=args.bbox,
        datetime=args.datetime,
        max_items=args.max_items,
        dask_address=args.dask_address,
        n_workers=args.workers,
    )
    print(refresh_dataset(params).model_dump_json(indent=2))
    return 0


def _option(text: str) -> tuple[str, object]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError("an option is key=value (value in YAML, e.g. kinds=[rgb])")
    return key, yaml.safe_load(value)


def _cmd_import(args: argparse.Namespace) -> int:
    from flows.import_dataset import ImportParams, import_dataset

    params = ImportParams(
        catalog=args.catalog,
        source=args.source,
        out_dir=args.out,
        options=dict(args.option),
        storage_options=dict(args.storage_option) or None,
        dask_address=args.dask_address,
        n_workers=args.workers,
        limit=args.limit,
        store_uri=args.store,
    )
    print(import_dataset(params).model_dump_json(indent=2))
    return 0


def _cmd_stac_serve(args: argparse.Namespace) -> int:
    import signal
    import time

    from dsat_core.data.stac_server import SkippedItem, serve_static_catalog

    # `docker stop` / systemd send SIGTERM: leave through the `with` below, so rustac stops too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    def report(skipped: SkippedItem) -> None:
        print(f"dsat stac serve: {skipped}", file=sys.stderr, flush=True)

    serving = serve_static_catalog(
        args.catalog, args.collection, host=args.host, port=args.port, on_skip=report
    )
    with serving as url:
        print(
            f"STAC API over {args.catalog} at {url} (collection {args.collection!r}); Ctrl-C stops it",
            flush=True,
        )
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from dsat_core.training.launch import build_launch_command, run_training_subprocess

    module = {
        "train": "dsat_core.training.train_diffusionsat",
        "train-controlnet": "dsat_core.training.train_controlnet",
    }[args.command]
    cmd = build_launch_command(
        module,
        args.config,
        nproc_per_node=args.nproc_per_node if args.nproc_per_node == "auto" else int(args.nproc_per_node),
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        rdzv_endpoint=args.rdzv_endpoint,
        launcher=args.launcher,
    )
    print(" ".join(cmd), flush=True)
    return run_training_subprocess(cmd, print)


def _cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from dsat_core.metadata import SatMetadata
    from dsat_core.pipelines import DiffusionSatPipeline
    from dsat_core.pipelines.export import save_samples

    metadata = SatMetadata.from_datetime(
        args.date, lon=args.lon, lat=args.lat, gsd=args.gsd, cloud_cover=args.cloud_cover
    )
    pipe = DiffusionSatPipeline.from_pretrained(args.model)
    pipe.set_scheduler(args.scheduler)
    seeds = [args.seed + i for i in range(args.num_images)]
    images = [
        pipe(
            args.prompt,
            metadata=metadata,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        ).images[0]
        for seed in seeds
    ]
    uint8 = [(image * 255).round().clip(0, 255).astype("uint8") for image in images]
    for path in save_samples(uint8, [metadata] * len(seeds), args.out, prompt=args.prompt, seeds=seeds):
        print(path)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from flows.evaluate import EvaluateParams, evaluate

    params = EvaluateParams(
        pipeline_dir=None if args.model.startswith(("models:/", "runs:/")) else args.model,
        model_uri=args.model if args.model.startswith(("models:/", "runs:/")) else None,
        store_uri=args.store,
        kind=args.kind,
        n_samples=args.n_samples,
        steps=args.steps,
        output_dir=args.output,
    )
    print(evaluate(params).model_dump_json(indent=2))
    return 0


def _cmd_apply(args: argparse.Namespace) -> int:
    import json

    from dsat_core.apply.job import ApplySpec, run_apply

    fields = ("catalog", "bbox", "datetime", "model", "out", "stac_api", "max_items", "input_gsd", "overlap",
              "batch_size", "steps", "guidance_scale", "strength", "seed", "prompt", "product", "fill_mask",
              "device", "max_pixels", "max_tiles", "work_dir", "nproc_per_node")  # fmt: skip
    values = {name: getattr(args, name) for name in fields if getattr(args, name) is not None}
    if args.mlflow_tracking_uri:
        values["mlflow_tracking_uri"] = args.mlflow_tracking_uri
    if args.flow:
        from flows.apply_model import apply_model

        print(json.dumps(apply_model(ApplySpec(kind=args.kind, **values)), indent=2))
        return 0
    report = run_apply(ApplySpec(kind=args.kind, **values), log=lambda line: print(line, file=sys.stderr))
    print(json.dumps(report.to_dict(), indent=2))
    return 0


def _add_apply_parser(sub: argparse._SubParsersAction) -> None:
    apply = sub.add_parser("apply", help="apply a model to an AOI: COG + STAC item per scene (apply-model)")
    apply.add_argument("kind", choices=("sr", "inpaint", "temporal", "generate"))
    apply.add_argument("--catalog", required=True, help="catalogs/<name>.yaml or a YAML path")
    apply.add_argument("--bbox", type=_bbox, required=True, help="AOI as lon_min,lat_min,lon_max,lat_max")
    apply.add_argument("--datetime", help="STAC datetime range, e.g. 2024-05-01/2024-06-30")
    apply.add_argument("--model", required=True, help="pipeline folder, models:/name@alias or runs:/id/path")
    apply.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    apply.add_argument("--stac-api", help="override the catalog's STAC API URL")
    apply.add_argument("--max-items", type=int)
    apply.add_argument("--input-gsd", type=float, help="metres per input pixel (default: the catalog's)")
    apply.add_argument("--overlap", type=int, help="input pixels shared by neighbouring tiles (default 1/4)")
    apply.add_argument("--batch-size", type=int)
    apply.add_argument("--steps", type=int)
    apply.add_argument("--guidance-scale", type=float)
    apply.add_argument(
        "--strength", type=float, help="start from the task's baseline (SR: bicubic); 1 = noise"
    )
    apply.add_argument("--seed", type=int)
    apply.add_argument("--prompt")
    apply.add_argument("--product", help="generate: the product whose grid and dates it follows")
    apply.add_argument("--fill-mask", help="inpaint: a mask GeoTIFF (1 = fill) instead of the cloud mask")
    apply.add_argument("--device")
    apply.add_argument("--max-pixels", type=int, help="largest output mosaic accepted (pixels)")
    apply.add_argument("--max-tiles", type=int, help="stop after this many tiles (rerun to resume)")
    apply.add_argument("--work-dir", help="scratch tiles and staging (default <out>/.work)")
    apply.add_argument("--nproc-per-node", type=int, help="processes sharing the tiles (torchrun, 1 per GPU)")
    apply.add_argument("--mlflow-tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    apply.add_argument("--flow", action="store_true", help="run it as the apply-model Prefect flow")
    apply.set_defaults(func=_cmd_apply)


def _cmd_demo(args: argparse.Namespace) -> int:
    from flows.demo import run_demo

    run_demo(Path(args.output), steps=args.steps)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from dsat_core.pipelines.reference import convert_reference, export_reference

    if args.convert_command == "reference":
        record = convert_reference(
            args.checkpoint, args.out, base=args.base, allow_pickle=args.allow_pickle, license=args.license
        )
        tensors = sum(c["count"] for c in record.components.values())
        print(f"{args.out}: {tensors} tensors converted from {record.source} (sha256 {record.sha256})")
    else:
        print(export_reference(args.model, args.out))
    return 0


def _add_convert_parser(sub: argparse._SubParsersAction) -> None:
    convert = sub.add_parser(
        "convert", help="convert released DiffusionSat checkpoints to and from this project"
    )
    kinds = convert.add_subparsers(dest="convert_command", required=True)
    ref = kinds.add_parser("reference", help="a reference-code checkpoint folder → a project pipeline folder")
    ref.add_argument(
        "--checkpoint", required=True, help="the released folder (pipeline, unet/ or controlnet/)"
    )
    ref.add_argument("--out", required=True, help="the project pipeline folder to write")
    ref.add_argument("--base", help="where the parts the checkpoint lacks come from (e.g. the base UNet)")
    ref.add_argument(
        "--allow-pickle", action="store_true", help="read .bin/.ckpt weights (torch.load weights_only=True)"
    )
    ref.add_argument(
        "--license", help="licence text for the model card (default: the DiffusionSat release's)"
    )
    export = kinds.add_parser("export-reference", help="a project pipeline folder → the reference layout")
    export.add_argument("--model", required=True, help="a project pipeline folder")
    export.add_argument("--out", required=True)
    convert.set_defaults(func=_cmd_convert)


def _add_source_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--catalog", default="local-samples", help="catalogs/<name>.yaml or a YAML path")
    parser.add_argument("--store", required=True, help="store URI: a local path or s3://bucket/prefix")
    parser.add_argument("--stac-api", help="override the catalog's STAC API URL")
    parser.add_argument("--bbox", type=_bbox, help="AOI as lon_min,lat_min,lon_max,lat_max (WGS84)")
    parser.add_argument("--datetime", help="STAC datetime range, e.g. 2024-01-01/2024-06-30")
    parser.add_argument("--max-items", type=int)
    parser.add_argument("--dask-address", default=os.environ.get("DASK_SCHEDULER_ADDRESS"))
    parser.add_argument(
        "--workers", type=int, default=2, help="LocalCluster workers when no address is given"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsat", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    ingest = sub.add_parser("ingest", help="search a STAC source and write new items to the store (Dask)")
    _add_source_args(ingest)
    ingest.set_defaults(func=_cmd_ingest)

    refresh = sub.add_parser("refresh", help="run the refresh-dataset Prefect flow once")
    _add_source_args(refresh)
    refresh.set_defaults(func=_cmd_refresh)

    imp = sub.add_parser("import", help="import a published dataset copy (fMoW, xBD, ...) as STAC items")
    imp.add_argument("--catalog", required=True, help="catalogs/<name>.yaml with an `importer:` block")
    imp.add_argument("--source", help="the copy: a folder or s3:// prefix (default: the YAML's source)")
    imp.add_argument("--out", help="static catalog folder (default data/imported/<catalog>)")
    imp.add_argument("--option", type=_option, action="append", default=[], help="importer option key=value")
    imp.add_argument(
        "--storage-option",
        type=_option,
        action="append",
        default=[],
        help="fsspec option of the copy, key=value (e.g. anon=true for public buckets)",
    )
    imp.add_argument("--limit", type=int, help="only the first N images")
    imp.add_argument("--store", help="also ingest the imported items into this store (refresh-dataset)")
    imp.add_argument("--dask-address", default=os.environ.get("DASK_SCHEDULER_ADDRESS"))
    imp.add_argument("--workers", type=int, default=2, help="LocalCluster workers (0: in this process)")
    imp.set_defaults(func=_cmd_import)

    stac = sub.add_parser("stac", help="STAC utilities").add_subparsers(dest="stac_command", required=True)
    serve = stac.add_parser("serve", help="serve a static STAC catalog as a STAC API on 127.0.0.1")
    serve.add_argument(
        "--catalog",
        default="catalogs/samples/catalog/catalog.json",
        help="a static catalog.json, or a folder written by `dsat import`",
    )
    serve.add_argument("--collection", default="local-samples")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=7826)
    serve.set_defaults(func=_cmd_stac_serve)

    for name, what in (("train", "DiffusionSat"), ("train-controlnet", "a 3D ControlNet task")):
        train = sub.add_parser(name, help=f"train {what} (torchrun / accelerate on every GPU given)")
        train.add_argument("--config", required=True, help="JSON training config (see dsat_core.training)")
        train.add_argument("--nproc-per-node", default="auto", help="processes per node; auto = visible GPUs")
        train.add_argument("--nnodes", type=int, default=1)
        train.add_argument("--node-rank", type=int, default=0)
        train.add_argument("--rdzv-endpoint", help="host:port of node 0 for multi-node runs")
        train.add_argument("--launcher", choices=("torchrun", "accelerate"), default="torchrun")
        train.set_defaults(func=_cmd_train)

    sample = sub.add_parser("sample", help="generate images (PNG + GeoTIFF) for a prompt and metadata")
    sample.add_argument(
        "--model",
        default="default",
        help="a DiffusionSatPipeline folder (default: the shipped 64 px base model, dsat_core/pipelines/"
        "default_model, whose README.md is its model card)",
    )
    sample.add_argument("--prompt", default="a satellite image")
    sample.add_argument("--lat", type=float)
    sample.add_argument("--lon", type=float)
    sample.add_argument("--gsd", type=float, help="metres per pixel")
    sample.add_argument("--cloud-cover", type=float, help="fraction 0-1")
    sample.add_argument("--date", help="acquisition date, YYYY-MM-DD")
    sample.add_argument("--num-images", type=int, default=1)
    sample.add_argument("--steps", type=int, default=20)
    sample.add_argument("--guidance-scale", type=float, default=3.0)
    sample.add_argument("--scheduler", choices=("ddim", "dpm++"), default="ddim")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--out", default="samples")
    sample.set_defaults(func=_cmd_sample)

    evaluate = sub.add_parser("evaluate", help="run the evaluate flow (metrics, maps, STAC output → MLflow)")
    evaluate.add_argument("--model", required=True, help="pipeline folder or models:/… / runs:/… URI")
    evaluate.add_argument("--store", required=True)
    evaluate.add_argument("--kind", choices=("generation", "sr", "temporal", "inpaint"), default="generation")
    evaluate.add_argument("--n-samples", type=int, default=64)
    evaluate.add_argument("--steps", type=int, default=20)
    evaluate.add_argument("--output", default="evaluate-output")
    evaluate.set_defaults(func=_cmd_evaluate)

    _add_convert_parser(sub)
    _add_apply_parser(sub)

    demo = sub.add_parser("demo", help="the main job end to end on the shipped sample scenes (CPU, minutes)")
    demo.add_argument("--output", default="demo-output")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's own)")
    demo.set_defaults(func=_cmd_demo)
    return parser


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors reported as one line and exit code 2 (only looked up once a command has failed)."""
    from dsat_core.data.stac import StacApiUnreachable

    return (ValueError, FileNotFoundError, StacApiUnreachable)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Without a server configured, flows start Prefect's temporary API; its 20 s start-up default times out on
    # a busy 2-core machine (seen: `make demo` beside a test run).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as err:
        print(f"dsat {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
