"""python -m sdsup.convert {import,export,csail,drn,upernet,segformer}: pretrained weights <-> sdsup model dirs.

  python -m sdsup.convert import --pretrained=DIFFUSERS_DIR --out=OUT
      DIFFUSERS_DIR: a diffusers pipeline directory (model_index.json, unet/,
      vae/, text_encoder/, tokenizer/, optional controlnet/ and scheduler/),
      safetensors weights only. OUT gets sdsup model dirs (unet/, vae/,
      text_encoder/, controlnet/), copies of tokenizer/ and scheduler/, and
      manifest.json. Use it with --config.vae.pretrained=OUT/vae
      --config.ldm.pretrained=OUT --config.text.tokenizer=clip
      --config.text.tokenizer_path=OUT/tokenizer.

  python -m sdsup.convert export --from=DIR --out=OUT
      DIR: an imported directory (above) or a training workdir. OUT becomes a
      diffusers StableDiffusionControlNetPipeline directory (a
      StableDiffusionPipeline without a ControlNet) that loads offline with
      from_pretrained(OUT, local_files_only=True). OUT/README.md says how to
      use it (tokenizer, layout conditioning).

  python -m sdsup.convert csail --encoder=encoder_epoch_50.pth --decoder=decoder_epoch_50.pth --out=OUT
      [--fake_class] [--image_mean=0.5,0.5,0.5 --image_std=0.5,0.5,0.5]
      The CSAIL semantic-segmentation (mit_semseg) ResNet + UPerNet weights
      ALDM uses (read with torch.load(weights_only=True)) -> an sdsup
      segmenter directory (style="csail"). --fake_class appends ALDM's
      discriminator "fake" output, last, zero-initialised: use the result as
      --config.control.discriminator_init=OUT; without it, as
      --config.evalseg.pretrained=OUT.

  python -m sdsup.convert drn --checkpoint=drn-d-105_ms_cityscapes.pth --out=OUT
      fyu/drn's DRNSeg (the DRN-D-105 that ALDM's paper scores Cityscapes
      with; torch.load(weights_only=True)) -> an sdsup segmenter directory
      for --config.evalseg.pretrained=OUT.

  python -m sdsup.convert upernet --pretrained=upernet-convnext-small --out=OUT
      a local transformers UperNetForSemanticSegmentation (ResNet or ConvNeXt
      backbone; safetensors) -> an sdsup segmenter directory: an alternative
      evaluator for --config.evalseg.pretrained=OUT.

  python -m sdsup.convert segformer --pretrained=segformer-b0-finetuned-ade-512-512 --out=OUT
      a local transformers SegformerForSemanticSegmentation (MiT-b0..b5;
      model.safetensors, or pytorch_model.bin read with
      torch.load(weights_only=True)) -> an sdsup segmenter directory: another
      alternative evaluator for --config.evalseg.pretrained=OUT.

Errors are printed as one line, `error: ...`, with exit status 1; set
SDSUP_DEBUG=1 to get tracebacks instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

# Conversions are small host-side jobs: keep jax off any accelerator and quiet. Set before the imports
# below, which import jax, and jax reads JAX_PLATFORMS when it is imported.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from sdsup.convert import csail, drn, exporter, importer, segformer, segmenter  # noqa: E402
from sdsup.cli import ArgumentParser, run_argparse  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m sdsup.convert",
        description="Convert between diffusers pipeline directories and sdsup model directories, or import "
                    "CSAIL (mit_semseg) UperNet segmenter weights.",
        epilog="See `python -m sdsup.convert import --help`, `... export --help` and `... csail --help`.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{import,export,csail,drn,upernet,segformer}")
    sub.required = True

    imp = sub.add_parser(
        "import", help="diffusers pipeline directory -> sdsup model directories",
        description="Convert every model of a diffusers pipeline directory (safetensors only) into sdsup model "
                    "directories under OUT; copy tokenizer/ and scheduler/; write OUT/manifest.json.")
    imp.add_argument("--pretrained", required=True, metavar="DIR", help="diffusers pipeline directory")
    imp.add_argument("--out", required=True, metavar="OUT", help="output directory (new or empty)")
    imp.add_argument("--components", default=None, metavar="LIST",
                     help="comma-separated subset of unet,vae,text_encoder,controlnet,tokenizer,scheduler "
                          "(default: every one present; unet, vae, text_encoder and tokenizer required)")
    imp.add_argument("--variant", default=None, help="weights variant, e.g. fp16 (reads *.fp16.safetensors)")
    imp.add_argument("--dtype", default="float32",
                     help="cast floating weights to this dtype (default float32; 'keep' keeps the stored dtypes)")
    imp.add_argument("--overwrite", action="store_true",
                     help="allow a non-empty OUT; only the entries written are replaced")

    exp = sub.add_parser(
        "export", help="imported dir or training workdir -> diffusers pipeline directory",
        description="Write a diffusers StableDiffusionControlNetPipeline directory (loads with "
                    "from_pretrained(OUT, local_files_only=True)) from an imported directory or a training workdir.")
    exp.add_argument("--from", dest="source", required=True, metavar="DIR",
                     help="an `import` output directory or a training workdir")
    exp.add_argument("--out", required=True, metavar="OUT", help="output directory (new or empty)")
    exp.add_argument("--scheduler", choices=("auto", "ddim"), default="auto",
                     help="auto: copy an imported scheduler, else DDIM from the run's diffusion settings; "
                          "ddim: always write a DDIMScheduler config")
    exp.add_argument("--overwrite", action="store_true",
                     help="allow a non-empty OUT; only the entries written are replaced")

    seg = sub.add_parser(
        "csail", help="CSAIL mit_semseg ResNet + UPerNet .pth files -> sdsup segmenter directory",
        description="Convert mit_semseg's encoder_epoch_*.pth + decoder_epoch_*.pth (ResNet + UPerNet, the network "
                    "ALDM's discriminator and ADE20K evaluator load) into an sdsup segmenter model directory.")
    seg.add_argument("--encoder", required=True, metavar="FILE", help="encoder state dict (.pth)")
    seg.add_argument("--decoder", required=True, metavar="FILE", help="decoder state dict (.pth)")
    seg.add_argument("--out", required=True, metavar="OUT", help="sdsup model directory to write")
    seg.add_argument("--fake_class", action="store_true",
                     help="append ALDM's 'fake' class as the last output (zero-initialised): the discriminator")
    seg.add_argument("--num_classes", type=int, default=None,
                     help="check that the decoder predicts this many classes (before --fake_class)")
    seg.add_argument("--image_mean", default=None, metavar="R,G,B",
                     help="normalisation of [0, 1] pixels (default ImageNet; ALDM's Cityscapes head: 0.5,0.5,0.5)")
    seg.add_argument("--image_std", default=None, metavar="R,G,B",
                     help="normalisation of [0, 1] pixels (default ImageNet; ALDM's Cityscapes head: 0.5,0.5,0.5)")
    seg.add_argument("--overwrite", action="store_true", help="replace a model already in OUT")

    net = sub.add_parser(
        "drn", help="fyu/drn DRNSeg .pth file -> sdsup segmenter directory",
        description="Convert a fyu/drn DRNSeg checkpoint (e.g. drn-d-105_ms_cityscapes.pth, the network that ALDM's "
                    "paper scores Cityscapes image mIoU with) into an sdsup model directory for "
                    "--config.evalseg.pretrained.")
    net.add_argument("--checkpoint", required=True, metavar="FILE", help="DRNSeg state dict or checkpoint (.pth)")
    net.add_argument("--out", required=True, metavar="OUT", help="sdsup model directory to write")
    net.add_argument("--overwrite", action="store_true", help="replace a model already in OUT")

    upernet = sub.add_parser(
        "upernet", help="transformers UperNetForSemanticSegmentation directory -> sdsup segmenter directory",
        description="Convert a local transformers UperNet (ResNet or ConvNeXt backbone, saved with save_pretrained; "
                    "e.g. a copy of openmmlab/upernet-convnext-small, ADE20K's 150 classes) into an sdsup segmenter "
                    "directory: an alternative image-mIoU evaluator for --config.evalseg.pretrained.")
    upernet.add_argument("--pretrained", required=True, metavar="DIR", help="config.json + model.safetensors")
    upernet.add_argument("--out", required=True, metavar="OUT", help="sdsup model directory to write")
    upernet.add_argument("--image_mean", default=None, metavar="R,G,B",
                         help="normalisation of [0, 1] pixels (default: preprocessor_config.json, else ImageNet)")
    upernet.add_argument("--image_std", default=None, metavar="R,G,B", help="as --image_mean")
    upernet.add_argument("--overwrite", action="store_true", help="replace a model already in OUT")

    segf = sub.add_parser(
        "segformer", help="transformers SegformerForSemanticSegmentation directory -> sdsup segmenter directory",
        description="Convert a local transformers Segformer (MiT-b0..b5 + all-MLP head, saved with save_pretrained; "
                    "e.g. a copy of nvidia/segformer-b0-finetuned-ade-512-512) into an sdsup segmenter directory: "
                    "an alternative image-mIoU evaluator for --config.evalseg.pretrained.")
    segf.add_argument("--pretrained", "--source", dest="pretrained", required=True, metavar="DIR",
                      help="config.json + model.safetensors (or pytorch_model.bin, read with weights_only=True)")
    segf.add_argument("--out", required=True, metavar="OUT", help="sdsup model directory to write")
    segf.add_argument("--image_mean", default=None, metavar="R,G,B",
                      help="normalisation of [0, 1] pixels (default: preprocessor_config.json, else ImageNet)")
    segf.add_argument("--image_std", default=None, metavar="R,G,B", help="as --image_mean")
    segf.add_argument("--overwrite", action="store_true", help="replace a model already in OUT")
    return parser


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _rgb(parser: argparse.ArgumentParser, name: str, value: Optional[str], default):
    if value is None:
        return default
    try:
        rgb = tuple(float(x) for x in value.split(","))
    except ValueError:
        rgb = ()
    if len(rgb) != 3:
        parser.error(f"--{name} takes three comma-separated numbers, got {value!r}")
    return rgb


def run(argv) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "csail":
        config = csail.convert(args.encoder, args.decoder, args.out, fake_class=args.fake_class,
                               num_classes=args.num_classes,
                               image_mean=_rgb(parser, "image_mean", args.image_mean, csail.IMAGENET_MEAN),
                               image_std=_rgb(parser, "image_std", args.image_std, csail.IMAGENET_STD),
                               overwrite=args.overwrite, log=_log)
        print(f"imported CSAIL UperNet ({config.num_classes} outputs{', last: fake' if args.fake_class else ''}) "
              f"into {args.out}")
    elif args.command == "upernet":
        config = segmenter.convert(args.pretrained, args.out, image_mean=_rgb(parser, "image_mean", args.image_mean, None),
                                   image_std=_rgb(parser, "image_std", args.image_std, None),
                                   overwrite=args.overwrite, log=_log)
        print(f"imported UperNet-{config.backbone} segmenter ({config.num_classes} classes) into {args.out}")
    elif args.command == "segformer":
        config = segformer.convert(args.pretrained, args.out,
                                   image_mean=_rgb(parser, "image_mean", args.image_mean, None),
                                   image_std=_rgb(parser, "image_std", args.image_std, None),
                                   overwrite=args.overwrite, log=_log)
        print(f"imported Segformer segmenter (stages {config.hidden_sizes}, {config.num_classes} classes) into "
              f"{args.out}")
    elif args.command == "drn":
        config = drn.convert(args.checkpoint, args.out, overwrite=args.overwrite, log=_log)
        print(f"imported DRN-{config.arch} segmenter ({config.num_classes} classes) into {args.out}")
    elif args.command == "import":
        components = [c.strip() for c in args.components.split(",") if c.strip()] if args.components else None
        dtype = None if args.dtype in ("keep", "none", "") else args.dtype
        manifest = importer.import_pretrained(args.pretrained, args.out, components=components, variant=args.variant,
                                              dtype=dtype, overwrite=args.overwrite, log=_log)
        done = sorted(manifest["components"]) + sorted(manifest["copied"])
        print(f"imported {', '.join(done)} into {args.out}")
        if manifest.get("usage"):
            print("train with: " + " ".join(manifest["usage"]))
    else:
        summary = exporter.export_pipeline(args.source, args.out, scheduler=args.scheduler, overwrite=args.overwrite,
                                           log=_log)
        print(f"exported {summary['pipeline']} ({', '.join(summary['components'])}) from {summary['source_kind']} "
              f"{args.source} to {args.out}")
        for note in summary.get("notes", []):
            print(f"note: {note}")
    return 0


def main(argv=None) -> int:
    """One `error: ...` line for every failure (exit 1; 130 on Ctrl-C); SDSUP_DEBUG=1 re-raises."""
    return run_argparse(run, argv)


if __name__ == "__main__":
    sys.exit(main())
