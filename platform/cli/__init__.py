"""Command-line entry point: `faceforge <command>`; each command is a thin wrapper over a library call."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _train(args: argparse.Namespace) -> None:
    from faceforge.train.app import main

    main(args.overrides)


def _eval(args: argparse.Namespace) -> None:
    from faceforge.data import ImageFolderDataset, load_bin, load_pairs
    from faceforge.eval import (
        embed_images,
        evaluate_verification,
        format_metrics,
        gallery_probe_split,
        identification_rank_k,
        save_roc_plot,
    )
    from faceforge.eval.report import pair_scores
    from faceforge.eval.sources import load_model

    model = load_model(args.model, args.tracking_uri)
    input_size = args.input_size or model.input_size
    embed = dict(input_size=input_size, crop_fraction=args.crop_fraction, batch_size=args.batch_size, progress=True)
    if args.bin or args.pairs:
        vset = load_bin(args.bin) if args.bin else load_pairs(args.pairs, args.root or args.pairs.parent)
        features = embed_images(model, vset.images, **embed)
        metrics = evaluate_verification(features, vset)
        print(format_metrics(metrics))
        if args.roc:
            save_roc_plot(pair_scores(features, vset), vset.issame, args.roc, f"{vset.name}: {args.model}")
            print(f"ROC plot: {args.roc}")
    if args.gallery:
        folder = ImageFolderDataset(args.gallery)
        gallery, probe = gallery_probe_split(folder.labels)
        paths = [path for path, _ in folder.samples]
        feats = embed_images(model, [Path(p).read_bytes() for p in paths], **embed)
        ranks = identification_rank_k(feats[gallery], folder.labels[gallery], feats[probe], folder.labels[probe])
        print("  ".join(f"rank-{k}={v:.4f}" for k, v in ranks.items()))


def _models(args: argparse.Namespace) -> None:
    from faceforge.models import cards_markdown, write_model_cards

    cards = write_model_cards(args.out, input_size=args.input_size, embedding_dim=args.embedding_dim)
    print(cards_markdown(cards))
    print(f"written to {args.out}")


def _data_pack(args: argparse.Namespace) -> None:
    from faceforge.data import pack_folder

    summary = pack_folder(args.src, args.dst, reencode=args.reencode, overwrite=args.overwrite)
    print("  ".join(f"{k}={v}" for k, v in summary.items()))


def _data_inspect(args: argparse.Namespace) -> None:
    from faceforge.data import format_summary, inspect_dataset

    print(format_summary(inspect_dataset(args.path, root=args.root)))


def _demo(args: argparse.Namespace) -> None:
    from faceforge.train.app import main

    # 64 px triples the steps that fit in the demo's 20 minutes on 2 CPU cores compared with 112 px.
    main(["trainer=demo", "model=mobilefacenet", "model.input_size=64", *args.overrides])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="faceforge", description="Train, evaluate and package face models.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model (Hydra overrides, -m for sweeps)", add_help=False)
    train.add_argument("overrides", nargs=argparse.REMAINDER)
    train.set_defaults(func=_train)

    demo = commands.add_parser("demo", help="train MobileFaceNet on real faces with 2 ranks, then evaluate")
    demo.add_argument("overrides", nargs=argparse.REMAINDER, help="extra Hydra overrides")
    demo.set_defaults(func=_demo)

    ev = commands.add_parser("eval", help="verification (pairs.txt or .bin) and 1:N identification")
    ev.add_argument("model", help="checkpoint directory or MLflow model URI (models:/name@champion)")
    ev.add_argument("--pairs", type=Path, help="LFW-format pairs.txt")
    ev.add_argument("--root", type=Path, help="image root of --pairs (default: its folder)")
    ev.add_argument("--bin", type=Path, help="InsightFace .bin verification file")
    ev.add_argument("--gallery", type=Path, help="image folder for 1:N identification (gallery/probe split)")
    ev.add_argument("--input-size", type=int, default=None, help="default: the model's own")
    ev.add_argument("--crop-fraction", type=float, default=1.0)
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--roc", type=Path, help="write the ROC curve to this PNG")
    ev.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for models:/ sources")
    ev.set_defaults(func=_eval)

    mdl = commands.add_parser("models", help="model card of every backbone: params, MACs, CPU latency")
    mdl.add_argument("--out", type=Path, default=DOCS / "models.md")
    mdl.add_argument("--input-size", type=int, default=112)
    mdl.add_argument("--embedding-dim", type=int, default=512)
    mdl.set_defaults(func=_models)

    data = commands.add_parser("data", help="dataset tools")
    data_cmds = data.add_subparsers(dest="data_command", required=True)
    pack = data_cmds.add_parser("pack", help="image folder -> InsightFace RecordIO (train.rec/.idx/property)")
    pack.add_argument("src", type=Path)
    pack.add_argument("dst", type=Path)
    pack.add_argument("--reencode", action="store_true", help="re-encode as JPEG instead of copying bytes")
    pack.add_argument("--overwrite", action="store_true")
    pack.set_defaults(func=_data_pack)
    insp = data_cmds.add_parser("inspect", help="summarise a folder, RecordIO dir, .bin or pairs.txt")
    insp.add_argument("path", type=Path)
    insp.add_argument("--root", type=Path, default=None, help="image root for a pairs.txt")
    insp.set_defaults(func=_data_inspect)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "eval" and not (args.pairs or args.bin or args.gallery):
        sys.exit("faceforge eval: error: give --pairs, --bin or --gallery")
    try:
        args.func(args)
    except (ValueError, OSError) as err:  # user mistakes and unreadable or existing paths: one line
        sys.exit(f"faceforge {args.command}: error: {err}")
