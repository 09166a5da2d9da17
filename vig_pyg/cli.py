"""``vig-pyg``: train, evaluate, inspect and draw ViG models (also ``python -m vig_pyg``).

Each subcommand is a thin shell over library functions; a :class:`~vig_pyg.errors.UsageError` (bad data,
bad checkpoint, run directory in the way) becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import logging
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from vig_pyg.errors import DataError, UsageError, one_line
from vig_pyg.torchrun import env_rank

__all__ = ["main"]

log = logging.getLogger("vig_pyg.cli")

#: What ``vig-pyg train`` (and ``make demo``) trains when given no options: the tiny registered Pyramid
#: ViG, at its own 96x96 input and k=9, on the embedded digits.
DEFAULT_MODEL = "pvig_test"


# -- argument helpers -----------------------------------------------------------------------------------
def _key_value(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. reduce_ratios=[2,2,1,1]), got {text!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare word: a string, e.g. act=relu
    return key, value


def _int_or_list(text: str) -> int | list[int]:
    values = _int_list(text)
    if not values:
        raise argparse.ArgumentTypeError(f"expected an integer or comma-separated integers, got {text!r}")
    return values[0] if len(values) == 1 and "," not in text else values


def _patch(text: str) -> tuple[float, float]:
    try:
        y, x = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected Y,X as fractions of the image, e.g. 0.5,0.5; got {text!r}"
        ) from None
    if not (0 <= y <= 1 and 0 <= x <= 1):
        raise argparse.ArgumentTypeError(
            f"patch {text!r}: Y and X are fractions of the image size, in [0, 1]"
        )
    return y, x


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, e.g. 0,2,4; got {text!r}"
        ) from None


def _add_model_overrides(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model overrides")
    g.add_argument("--img-size", type=int, help="input size the model is planned for (square)")
    g.add_argument(
        "--k", type=_int_or_list, help="neighbours per node, or one per graph block: 9 or 6,6,9,9,12"
    )
    g.add_argument("--conv", help="graph convolution: mr, edge, gin, sage or any PyG conv name (e.g. gat)")
    g.add_argument(
        "--graph", help="graph builder: knn (ViG's dynamic kNN), grid, random, radius or a registered name"
    )
    g.add_argument(
        "--graph-option",
        dest="graph_options",
        action="append",
        type=_key_value,
        default=None,
        metavar="KEY=VALUE",
        help="an option of the graph builder, e.g. --graph radius --graph-option r=0.8 (repeatable)",
    )
    g.add_argument(
        "--set",
        dest="overrides",
        action="append",
        type=_key_value,
        default=None,
        metavar="KEY=VALUE",
        help="any other model argument, e.g. --set reduce_ratios=[2,2,1,1] (repeatable)",
    )


def _model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(args.overrides or [])
    for name in ("img_size", "k", "conv", "graph"):
        if getattr(args, name, None) is not None:
            kwargs[name] = getattr(args, name)
    if getattr(args, "graph_options", None):
        kwargs["graph_kwargs"] = dict(args.graph_options)
    return kwargs


# -- subcommands ----------------------------------------------------------------------------------------
_TRAIN_FIELDS = {
    "model": "model",
    "data": "data",
    "out": "out_dir",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "lr": "lr",
    "min_lr": "min_lr",
    "weight_decay": "weight_decay",
    "warmup_epochs": "warmup_epochs",
    "label_smoothing": "label_smoothing",
    "drop_path": "drop_path",
    "clip_grad": "clip_grad",
    "amp": "amp",
    "sync_bn": "sync_bn",
    "pretrained": "pretrained",
    "seed": "seed",
    "limit_train": "limit_train",
    "limit_val": "limit_val",
    "workers": "workers",
    "device": "device",
    "progress": "progress",
    "resume": "resume",
    "overwrite": "overwrite",
    "stop_after": "stop_after",
}


def _default_out(model: str, data: str | None) -> str:
    name = "digits" if data is None else (Path(data).resolve().name or "data")
    return str(Path("runs") / f"{model}-{name}")


def cmd_train(args: argparse.Namespace) -> int:
    from vig_pyg.train import TrainConfig, train

    values = {
        field: getattr(args, opt) for opt, field in _TRAIN_FIELDS.items() if getattr(args, opt) is not None
    }
    kwargs = _model_kwargs(args)
    if kwargs:
        values["model_kwargs"] = kwargs
    explicit = set(values)
    values.setdefault("model", DEFAULT_MODEL)
    values.setdefault("out_dir", _default_out(values["model"], values.get("data")))
    args.out = values["out_dir"]  # for the resume hint after an interruption
    with _signals_interrupt((signal.SIGTERM, signal.SIGHUP)):
        result = train(TrainConfig(**values), explicit=explicit)
    if env_rank() == 0:
        if result.epochs_done:
            files = [f"{result.last_checkpoint} (last)"]
            if result.best_epoch and result.best_checkpoint.is_file():
                files.insert(0, f"{result.best_checkpoint} (best, epoch {result.best_epoch})")
            print(f"checkpoints: {', '.join(files)}")
        print(f"best val top-1: {result.best_top1:.1f}%" if result.best_epoch else "no epoch scored")
    return 0


class Interrupted(KeyboardInterrupt):
    """A stop signal (SIGTERM, SIGHUP), handled like Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _signals_interrupt(signums: Sequence[int]) -> Iterator[None]:
    """Turn ``signums`` into :class:`Interrupted` while the block runs: a clean stop, like Ctrl-C.

    Training files are written atomically, so stopping at any point leaves every file whole.
    """

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    available = [s for s in signums if hasattr(signal, signal.Signals(s).name)]
    try:
        previous = {s: signal.signal(s, handler) for s in available}
    except ValueError:  # not the main thread: leave the signals alone
        previous = {}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def cmd_eval(args: argparse.Namespace) -> int:
    from vig_pyg.train import evaluate_checkpoint

    metrics = evaluate_checkpoint(
        args.checkpoint,
        data=args.data,
        model_name=args.model,
        model_kwargs=_model_kwargs(args),
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        amp=args.amp,
        limit=args.limit,
        progress=args.progress,
    )
    if args.json:
        print(json.dumps(metrics))
    else:
        where = args.data or "the embedded digits"
        print(
            f"{metrics['model']} on {where} ({int(metrics['count'])} images): "
            f"top-1 {metrics['val_top1']:.2f}%  top-5 {metrics['val_top5']:.2f}%  "
            f"loss {metrics['val_loss']:.4f}"
        )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from vig_pyg.models import create_model
    from vig_pyg.summary import format_summary, model_summary

    try:
        model = create_model(args.model, num_classes=args.num_classes, **_model_kwargs(args))
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None
    size = args.input_size or getattr(model, "img_size", (224, 224))[0]
    if min(model.min_input_size) > size:  # type: ignore[operator]
        raise UsageError(
            f"{args.model} needs at least {model.min_input_size[0]}x{model.min_input_size[1]} inputs"
        )  # type: ignore[index]
    print(format_summary(model_summary(model, (3, size, size)), args.model))
    return 0


def cmd_visualize(args: argparse.Namespace) -> int:
    from vig_pyg.data import load_digits_split, open_image
    from vig_pyg.files import atomic_write_bytes
    from vig_pyg.models import create_model
    from vig_pyg.train.checkpoint import default_preprocessing, load_model
    from vig_pyg.viz import visualize_graph

    if args.checkpoint is None and args.model is None:
        raise UsageError("give a checkpoint to draw, or --model NAME for an untrained model")
    if args.checkpoint is not None:
        model, info = load_model(args.checkpoint, args.model, _model_kwargs(args))
        name, pre = info.model_name, info.preprocessing
        what = f"{name} from {args.checkpoint}"
    else:
        try:
            model = create_model(args.model, num_classes=10, **_model_kwargs(args))
        except (ValueError, TypeError) as err:
            raise UsageError(str(err)) from None
        name, pre = args.model, default_preprocessing(args.model, model)
        what = f"{name} (untrained)"
    if args.image is not None:
        image: Any = open_image(args.image)
        what += f" on {Path(args.image).name}"
    else:
        _, val = load_digits_split(pre.size)
        if not 0 <= args.index < len(val):
            raise DataError(
                f"--index {args.index} is out of range: the digits' validation split has {len(val)} images"
            )
        image, label = val[args.index]
        what += f" on validation digit #{args.index} (a {label})"
    try:
        picture = visualize_graph(
            model, image, pre, args.patch or [(0.5, 0.5)], args.blocks, args.panel_size, what
        )
    except ValueError as err:
        raise UsageError(str(err)) from None
    out = (
        Path(args.out)
        if args.out
        else (Path(args.checkpoint).parent if args.checkpoint else Path(".")) / "graph.png"
    )
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    atomic_write_bytes(out, buf.getvalue())
    print(f"graph picture: {out}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from vig_pyg.train import convert_checkpoint

    info = convert_checkpoint(
        args.source, args.dest, args.model, overwrite=args.overwrite, model_kwargs=_model_kwargs(args)
    )
    print(
        f"wrote {info['path']}: {info['model']}, {info['num_classes']} classes, {info['tensors']} tensors "
        "(loads back strictly)"
    )
    return 0


def cmd_kernels(args: argparse.Namespace) -> int:
    from vig_pyg import kernels

    if args.build:
        try:
            path = kernels.build(verbose=args.verbose)
        except (OSError, RuntimeError, subprocess.CalledProcessError) as err:
            print(
                f"vig-pyg kernels: the build failed ({one_line(err)}); vig_pyg works without it",
                file=sys.stderr,
            )
            return 1
        print(f"compiled kernels (kNN top-k, neighbour max): ready ({path})")
    else:
        state = "loaded" if kernels.available() else "not built (vig-pyg kernels --build compiles them)"
        print(f"compiled kernels (kNN top-k, neighbour max): {state}")
    return 0


# -- parser ---------------------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    g.add_argument("-v", "--verbose", action="store_true", help="debug messages")


def build_parser() -> argparse.ArgumentParser:
    """The ``vig-pyg`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="vig-pyg", description="Vision GNN on PyTorch Geometric: train, evaluate, inspect, draw graphs."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="train a model (default: a small Pyramid ViG on the embedded digits)",
        description="Train a model. Runs under torchrun too (DistributedDataParallel). Ends with a line "
        "'best val top-1: NN.N%'.",
    )
    p.add_argument("--model", help=f"registered model name (default {DEFAULT_MODEL}; see `vig-pyg info`)")
    p.add_argument(
        "--data", help="image folder with train/<class>/* and val/<class>/* (default: the embedded digits)"
    )
    p.add_argument("--out", help="run directory (default runs/<model>-<data>)")
    p.add_argument("--epochs", type=int, help="training epochs (default 12)")
    p.add_argument("--batch-size", type=int, help="images per step and process (default 64)")
    p.add_argument("--lr", type=float, help="peak learning rate of AdamW (default 2e-3)")
    p.add_argument("--min-lr", type=float, help="final learning rate of the cosine decay (default 1e-5)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.05)")
    p.add_argument("--warmup-epochs", type=float, help="linear warm-up epochs (default 1)")
    p.add_argument("--label-smoothing", type=float, help="default 0.1")
    p.add_argument("--drop-path", type=float, help="stochastic depth rate (default 0)")
    p.add_argument("--clip-grad", type=float, help="clip the gradient norm to this value")
    p.add_argument("--amp", action="store_true", default=None, help="bf16 autocast")
    p.add_argument("--sync-bn", action="store_true", default=None, help="SyncBatchNorm under torchrun (GPUs)")
    p.add_argument("--pretrained", help="start from these weights (official or vig_pyg; a path or URL)")
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--limit-train", type=int, help="use only N training images, evenly spaced (smoke tests)")
    p.add_argument("--limit-val", type=int, help="use only N validation images, evenly spaced")
    p.add_argument(
        "--workers", type=int, help="data-loading processes (default: 0 for the digits, else up to 4)"
    )
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: on a terminal)",
    )
    p.add_argument(
        "--resume", action="store_true", default=None, help="continue the run in --out from its last.pt"
    )
    p.add_argument("--overwrite", action="store_true", default=None, help="replace the run in --out")
    p.add_argument(
        "--stop-after", type=int, help="stop after N epochs of this invocation (--resume continues)"
    )
    _add_model_overrides(p)
    _common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="top-1/top-5 of a checkpoint", description="Top-1/top-5 of a checkpoint.")
    p.add_argument("checkpoint", help="a vig_pyg checkpoint (best.pt), an official .pth or a .safetensors")
    p.add_argument(
        "--data", help="image folder; DIR/val/<class>/* is used (default: the digits' validation split)"
    )
    p.add_argument("--model", help="model name (needed for official or converted weights)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--limit", type=int, help="only N images, evenly spaced")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    _add_model_overrides(p)
    _common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("info", help="parameters, MACs and the graph blocks of a model")
    p.add_argument("model", help="registered model name")
    p.add_argument(
        "--input-size", type=int, help="square input side for MACs and node counts (default img_size)"
    )
    p.add_argument("--num-classes", type=int, default=1000)
    _add_model_overrides(p)
    _common(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "visualize",
        help="draw the kNN neighbours of chosen patches (PNG)",
        description="Draw, over an input image, the neighbours chosen patches get in chosen graph blocks.",
    )
    p.add_argument(
        "checkpoint", nargs="?", help="a trained checkpoint (or use --model for an untrained model)"
    )
    p.add_argument("--model", help="model name (an untrained model, or the model of bare weights)")
    p.add_argument("--image", help="an image file (default: a digit of the validation split)")
    p.add_argument("--index", type=int, default=0, help="which validation digit, without --image (default 0)")
    p.add_argument(
        "--patch",
        type=_patch,
        action="append",
        metavar="Y,X",
        help="centre patch as fractions (repeatable; default 0.5,0.5)",
    )
    p.add_argument(
        "--blocks", type=_int_list, help="graph blocks to draw, e.g. 0,2,4 (default: one per stage)"
    )
    p.add_argument("--panel-size", type=int, default=320, help="pixels per panel")
    p.add_argument("--out", help="PNG to write (default: graph.png beside the checkpoint, or here)")
    _add_model_overrides(p)
    _common(p)
    p.set_defaults(func=cmd_visualize)

    p = sub.add_parser("convert", help="an official checkpoint to vig_pyg's safetensors")
    p.add_argument("source", help="official .pth / .pth.tar")
    p.add_argument("dest", help="output .safetensors")
    p.add_argument("--model", required=True, help="the variant the weights are for, e.g. pvig_s_224_gelu")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    _add_model_overrides(p)
    _common(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "kernels",
        help="build or check the optional compiled CPU kernels (kNN top-k, neighbour max)",
        description="The optional compiled CPU kernels (the dense kNN's top-k, MRConv's neighbour max): "
        "their state, or --build them for the installed torch (needs a C++ compiler and ninja; about 30 s).",
    )
    p.add_argument("--build", action="store_true", help="compile them now (kept in ~/.cache/vig_pyg/ops)")
    _common(p)
    p.set_defaults(func=cmd_kernels)
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    rank = env_rank()
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet or rank != 0 else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s" if rank == 0 else f"[rank {rank}] %(message)s"))
    root = logging.getLogger("vig_pyg")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # torch.fx warns once about an API PyG calls; it says nothing about the user's run.
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``vig-pyg``; returns the exit status (0 ok, 1 a file error, 2 a usage error, 128 + the signal
    number when stopped by a signal: 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args)
    rank = env_rank()
    where = f"[rank {rank}] vig-pyg {args.command}" if rank else f"vig-pyg {args.command}"
    try:
        return int(args.func(args))
    except UsageError as err:
        print(f"{where}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # a file the library does not write itself (an input, a download cache, ...)
        if args.verbose:
            raise
        print(f"{where}: error: {one_line(err)} (run with -v for the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        signum = err.signum if isinstance(err, Interrupted) else signal.SIGINT
        how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        hint = ""
        if args.command == "train":
            hint = f"; continue with: vig-pyg train --out {args.out} --resume (plus the same options)"
        print(f"{where}: {how}{hint}", file=sys.stderr)
        return 128 + int(signum)


if __name__ == "__main__":
    sys.exit(main())
