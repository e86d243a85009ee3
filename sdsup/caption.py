"""python -m sdsup.caption: caption a folder of images with BLIP, for training on images that have no captions.

  python -m sdsup.caption --images=DIR --model=BLIP_DIR --out=captions.json
      [--recursive] [--batch_size=16] [--max_new_tokens=30] [--num_beams=3]
      [--prompt="a photo of"] [--device=cpu|cuda] [--skip_unreadable]

DIR: every .jpg/.jpeg/.png (any case) directly in it, or in its subfolders
too with --recursive (names starting with "." are left out), in sorted order.
Each image's key is its file stem (`ADE_train_00000001.jpg` ->
`ADE_train_00000001`), the name the dataset builders pair images, label maps
and captions by; two images with the same stem are an error.

BLIP_DIR: a local transformers BLIP captioning directory
(`BlipForConditionalGeneration` weights and config plus its `BlipProcessor`
files, e.g. a saved copy of Salesforce/blip-image-captioning-base), loaded
with `local_files_only=True`: nothing is downloaded.

OUT: a JSON object `{stem: caption}` and nothing else -- the format ALDM
published for its ADE20K and Cityscapes captions, which sdsup's dataset
builders read. With --prompt, BLIP continues the prompt and the caption
starts with it ("a photo of a kitchen with ..."). The captioner and its
settings (model, versions, batch size, beams, max_new_tokens, prompt, date,
number of captions, and one entry per run) go in a sidecar, `OUT.meta.json`.

Resumable: stems already in OUT are skipped, so a killed run continues where
it stopped. OUT is rewritten atomically (a temporary file in its directory,
then `os.replace`) after every batch, so a kill never leaves half a JSON file
and never loses a finished batch. An image that does not decode stops the run
with an error naming it (what is already in OUT stays); with
--skip_unreadable it is reported, left out of OUT, and counted at the end.

Errors are printed as one line, `error: ...`, with exit status 1; set
SDSUP_DEBUG=1 to get tracebacks instead.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from PIL import Image, ImageOps
from tqdm import tqdm

from sdsup.cli import ArgumentParser, run_argparse
from sdsup.errors import SdsupError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
META_SUFFIX = ".meta.json"
ARCHITECTURE = "BlipForConditionalGeneration"
DEVICES = ("cpu", "cuda")


class CaptionError(SdsupError):
    """Bad captioning input: a folder, a model directory, an image, an existing output file."""


def _default_log(message: str) -> None:
    tqdm.write(message, file=sys.stderr)  # above the progress bar, when one is showing


# ----------------------------------------------------------------------------------------------- images


def find_images(images_dir: str, recursive: bool = False) -> List[Tuple[str, str]]:
    """[(stem, path)] of the images in `images_dir`, sorted by path relative to it; stems must be unique."""
    if not os.path.isdir(images_dir):
        what = "is not a directory" if os.path.exists(images_dir) else "does not exist"
        raise CaptionError(f"--images {images_dir} {what}")
    paths = []
    if recursive:
        for folder, dirs, files in os.walk(images_dir):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            paths.extend(os.path.join(folder, f) for f in files)
    else:
        paths = [os.path.join(images_dir, f) for f in os.listdir(images_dir)]
    paths = sorted((p for p in paths if _is_image(p)), key=lambda p: os.path.relpath(p, images_dir))
    if not paths:
        hint = "" if recursive else " (--recursive also looks in subfolders)"
        raise CaptionError(f"no {'/'.join(IMAGE_EXTENSIONS)} images in {images_dir}{hint}")
    seen: Dict[str, str] = {}
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem in seen:
            raise CaptionError(f"two images have the stem {stem!r}, the key captions are stored under: "
                               f"{seen[stem]} and {path}; rename or remove one")
        seen[stem] = path
    return list(seen.items())


def _is_image(path: str) -> bool:
    name = os.path.basename(path)
    return (not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)
            and os.path.isfile(path))


def _load_image(path: str) -> Image.Image:
    """The decoded RGB image, upright as viewers show it (EXIF orientation applied); CaptionError if it is not one."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return im.convert("RGB")
    # PIL reports a broken file as OSError, ValueError, SyntaxError, EOFError, DecompressionBombError or
    # struct.error, depending on the format and where it breaks; all mean "this file does not decode".
    except Exception as e:  # noqa: BLE001
        raise CaptionError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------------------------- output


def read_captions(out: str) -> Dict[str, str]:
    """The captions already in `out` ({} when it does not exist); CaptionError unless it is {stem: string}."""
    if not os.path.exists(out):
        return {}
    if not os.path.isfile(out):
        raise CaptionError(f"--out {out} is not a file")
    try:
        with open(out, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CaptionError(f"--out {out} exists but is not JSON ({e}); it was left untouched: "
                           "move it away or choose another --out") from e
    if not isinstance(data, dict):
        raise CaptionError(f"--out {out} holds a JSON {type(data).__name__}, not an object {{stem: caption}}; "
                           "it was left untouched: move it away or choose another --out")
    bad = [k for k, v in data.items() if not isinstance(v, str)]
    if bad:
        raise CaptionError(f"--out {out} is not a JSON object of caption strings ({len(bad)} values are not "
                           f"strings, e.g. {bad[0]!r}: {data[bad[0]]!r}); it was left untouched: move it away "
                           "or choose another --out")
    return data


def write_json_atomically(path: str, obj) -> None:
    """`obj` as JSON at `path`, via a temporary file in the same directory and `os.replace`: all or nothing."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give it a normal file's permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def meta_path(out: str) -> str:
    return out + META_SUFFIX


def _previous_runs(path: str, log: Callable[[str], None]) -> List[dict]:
    if not os.path.exists(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            runs = json.load(f).get("runs", [])
        if isinstance(runs, list):
            return runs
    except (OSError, ValueError, AttributeError):
        pass
    log(f"warning: {path} is not a captions meta file written by sdsup.caption; it is replaced")
    return []


# ----------------------------------------------------------------------------------------------- model


def _model_config(model_dir: str) -> dict:
    """config.json of a BLIP captioning directory; CaptionError naming `model_dir` if it is not one."""
    if not os.path.isdir(model_dir):
        what = "is not a directory" if os.path.exists(model_dir) else "does not exist"
        raise CaptionError(f"--model {model_dir} {what}")
    config_file = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_file):
        raise CaptionError(f"--model {model_dir} is not a transformers model directory (no config.json)")
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise CaptionError(f"--model {model_dir}: cannot read config.json: {e}") from e
    if not isinstance(config, dict) or config.get("model_type") != "blip":
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise CaptionError(f"--model {model_dir} is not a BLIP model (config.json model_type is {kind!r}, "
                           f"not 'blip')")
    architectures = config.get("architectures") or []
    if architectures and ARCHITECTURE not in architectures:
        raise CaptionError(f"--model {model_dir} is a BLIP {'/'.join(architectures)}, not a captioning model "
                           f"({ARCHITECTURE}), e.g. Salesforce/blip-image-captioning-base")
    return config


def _load_blip(model_dir: str, device: str, log: Callable[[str], None]):
    """(model on `device` in eval mode, processor), both from the local directory only."""
    import torch  # deferred: torch and transformers take seconds to load; --help and argument errors should not wait
    from transformers import BlipForConditionalGeneration, BlipProcessor  # deferred: as torch, above

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CaptionError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA device")
    try:
        model, info = BlipForConditionalGeneration.from_pretrained(
            model_dir, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise CaptionError(f"--model {model_dir}: cannot load {ARCHITECTURE}: {type(e).__name__}: {e}") from e
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        log(f"warning: --model {model_dir}: {len(missing)} weights missing from the checkpoint were initialized "
            f"at random (e.g. {missing[0]}); the captions may be garbage")
    try:
        processor = BlipProcessor.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CaptionError(f"--model {model_dir}: cannot load its BlipProcessor (preprocessor and tokenizer "
                           f"files): {type(e).__name__}: {e}") from e
    return model.to(device).eval(), processor


def _versions() -> Dict[str, str]:
    import torch  # deferred: only called after _load_blip has imported it
    import transformers  # deferred: only called after _load_blip has imported it

    return {"transformers": transformers.__version__, "torch": torch.__version__,
            "python": sys.version.split()[0]}


def _generate(model, processor, images: List[Image.Image], prompt: Optional[str], device: str,
              num_beams: int, max_new_tokens: int) -> List[str]:
    import torch  # deferred: only called after _load_blip has imported it

    if prompt:
        inputs = processor(images=images, text=[prompt] * len(images), return_tensors="pt")
    else:
        inputs = processor(images=images, return_tensors="pt")
    inputs = {k: v.to(device) for k, v in inputs.items()}
    with torch.inference_mode():
        ids = model.generate(**inputs, num_beams=num_beams, max_new_tokens=max_new_tokens)
    return [" ".join(text.split()) for text in processor.tokenizer.batch_decode(ids, skip_special_tokens=True)]


# ----------------------------------------------------------------------------------------------- library


def caption_folder(images_dir: str, model_dir: str, out: str, *, batch_size: int = 16,
                   max_new_tokens: int = 30, num_beams: int = 3, prompt: Optional[str] = None,
                   device: str = "cpu", recursive: bool = False, skip_unreadable: bool = False,
                   progress: bool = True, log: Optional[Callable[[str], None]] = None) -> Dict[str, str]:
    """Captions the images of `images_dir` not yet in `out`; returns every caption now in `out` {stem: caption}.

    `out` is rewritten atomically after every batch, and `out.meta.json`
    with it (see the module docstring). Raises CaptionError for bad input;
    whatever was written before an error stays.
    """
    log = log or _default_log
    for name, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens),
                        ("num_beams", num_beams)):
        if not isinstance(value, int) or value < 1:
            raise CaptionError(f"--{name} must be a positive integer, got {value!r}")
    if device not in DEVICES and not device.startswith("cuda:"):
        raise CaptionError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    prompt = prompt.strip() if prompt and prompt.strip() else None

    images = find_images(images_dir, recursive)
    config = _model_config(model_dir)
    out_folder = os.path.dirname(os.path.abspath(out))
    if os.path.exists(out_folder) and not os.path.isdir(out_folder):
        raise CaptionError(f"--out {out}: {out_folder} is not a directory")
    captions = read_captions(out)
    todo = [(stem, path) for stem, path in images if stem not in captions]
    done = len(images) - len(todo)
    log(f"{len(images)} images in {images_dir}; {done} already captioned in {out}; {len(todo)} to caption")
    if not todo:
        return captions

    model, processor = _load_blip(model_dir, device, log)
    os.makedirs(out_folder, exist_ok=True)
    settings = {"batch_size": batch_size, "num_beams": num_beams, "max_new_tokens": max_new_tokens,
                "prompt": prompt, "device": device}
    run = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "images": os.path.abspath(images_dir), "recursive": recursive,
        "model": {"path": os.path.abspath(model_dir), "_name_or_path": config.get("_name_or_path"),
                  "architectures": config.get("architectures"), "model_type": config.get("model_type"),
                  "saved_with_transformers": config.get("transformers_version")},
        "settings": settings, "versions": _versions(), "new_captions": 0,
    }
    runs = _previous_runs(meta_path(out), log) + [run]

    unreadable: List[str] = []
    bar = tqdm(total=len(todo), unit="img", desc="captioning", file=sys.stderr, dynamic_ncols=True,
               disable=not progress)
    try:
        for start in range(0, len(todo), batch_size):
            batch, pictures = [], []
            for stem, path in todo[start:start + batch_size]:
                try:
                    pictures.append(_load_image(path))
                    batch.append(stem)
                except CaptionError as e:
                    if not skip_unreadable:
                        raise CaptionError(f"{e} (--skip_unreadable leaves such files out; the "
                                           f"{len(captions)} captions in {out} are kept)") from e
                    log(f"warning: skipped: {e}")
                    unreadable.append(path)
                    bar.update(1)
            if not batch:
                continue
            texts = _generate(model, processor, pictures, prompt, device, num_beams, max_new_tokens)
            captions.update(zip(batch, texts))
            run["new_captions"] += len(batch)
            write_json_atomically(out, captions)
            write_json_atomically(meta_path(out), _meta(out, captions, run, runs))
            bar.update(len(batch))
    finally:
        bar.close()
    if run["new_captions"]:
        log(f"wrote {run['new_captions']} new captions to {out} ({len(captions)} in all; settings in "
            f"{meta_path(out)})")
    else:
        log(f"no new captions: {out} is unchanged")
    if unreadable:
        log(f"skipped {len(unreadable)} unreadable images (not in {out}; a rerun tries them again)")
    return captions


def _meta(out: str, captions: Dict[str, str], run: dict, runs: List[dict]) -> dict:
    """The sidecar: the latest run's captioner and settings at the top, every run that added captions below."""
    return {"captions_file": os.path.basename(out), "num_captions": len(captions), "captioner": "BLIP",
            "date": run["date"], "model": run["model"], **run["settings"], "versions": run["versions"],
            "runs": runs}


# ----------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m sdsup.caption",
        description="Caption every .jpg/.jpeg/.png of a folder with a local BLIP model; write {stem: caption} "
                    "as JSON (resumable; settings in OUT.meta.json).")
    parser.add_argument("--images", required=True, metavar="DIR", help="folder of images")
    parser.add_argument("--model", required=True, metavar="BLIP_DIR",
                        help="local BlipForConditionalGeneration + BlipProcessor directory (nothing is downloaded)")
    parser.add_argument("--out", required=True, metavar="OUT",
                        help="captions JSON {stem: caption}; stems already in it are skipped")
    parser.add_argument("--recursive", action="store_true", help="also caption images in subfolders")
    parser.add_argument("--batch_size", type=int, default=16, help="images per generate call (default 16)")
    parser.add_argument("--max_new_tokens", type=int, default=30, help="caption length limit (default 30)")
    parser.add_argument("--num_beams", type=int, default=3, help="beam search width (default 3)")
    parser.add_argument("--prompt", default=None,
                        help='conditional captioning prefix, e.g. "a photo of"; captions start with it')
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--skip_unreadable", action="store_true",
                        help="warn about and skip images that do not decode instead of stopping")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def _run(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    caption_folder(args.images, args.model, args.out, batch_size=args.batch_size,
                   max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, prompt=args.prompt,
                   device=args.device, recursive=args.recursive, skip_unreadable=args.skip_unreadable,
                   progress=not args.no_progress)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_argparse(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
