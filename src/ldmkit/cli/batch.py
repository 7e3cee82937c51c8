"""``ldmkit txt2img --prompts FILE``: many prompts, in chunks of ``--batch-size``, resumable, and split between
the processes of ``accelerate launch``.

Every image is an :class:`Item` (prompt, negative prompt, seed, position) with a file name fixed by the item
alone, so a rerun finds what a killed run finished. The items are cut into chunks in input order and the
chunks never change with the number of processes or with what is already done: a chunk that lacks an image
is generated whole and only its missing images are written. An image therefore has the same pixels whether
the run was one process, several, or killed and resumed (the batch a sample is computed in changes its
floating-point rounding, so keeping the batches is what keeps the pixels). Only the chunks that lack an
image are split between the processes, so a resumed run keeps them all busy until the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..errors import LDMKitError
from ..io import atomic_write_text
from ..pipelines.presets import apply_preset
from .generate import (
    MAX_SEED,
    cmd_txt2img,
    generators,
    image_metadata,
    load_pipeline,
    output_folder,
    save_png,
    slug,
)
from .preset_options import run_preset, upscale_preset

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
DEFAULT_BATCH_SIZE = 8
MAX_IMAGES = 1_000_000  # their list takes ~0.3 GB
JSONL_KEYS = {"prompt": (str,), "seed": (int,), "negative_prompt": (str, type(None)), "n": (int,)}


@dataclass(frozen=True)
class Item:
    """One image to make: ``index`` is its place among all the file's images, ``line`` the line it came from."""

    index: int
    line: int
    prompt: str
    negative_prompt: str | None
    seed: int


# ------------------------------------------------------------------------------------------- the prompt file
def read_prompt_file(path: str, n: int, seed: int | None, negative_prompt: str | None) -> list[Item]:
    """The items of a prompt file: one prompt a line (blank lines and ``#`` comments skipped), or JSONL (a
    ``.jsonl`` name, or a first non-blank character ``{``; blank and ``#`` lines skipped too) with ``prompt`` and
    optional ``seed``,
    ``negative_prompt`` and ``n`` per line. A line's images get its seed, seed + 1, ...; the others get the
    base seed (``--seed``, default 0) plus their index, so that every seed is known before the run."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LDMKitError(f"--prompts {path}: no such file.") from None
    except IsADirectoryError:
        raise LDMKitError(f"--prompts {path} is a folder; give a text or JSONL file of prompts.") from None
    except UnicodeDecodeError as e:
        raise LDMKitError(f"--prompts {path}: not UTF-8 text (byte {e.start}); save it as UTF-8.") from None
    except OSError as e:
        raise LDMKitError(f"--prompts {path}: cannot read it ({e.strerror}).") from None
    jsonl = path.endswith(".jsonl") or text.lstrip().startswith("{")
    rows = _jsonl_rows(path, text, n, negative_prompt) if jsonl else _text_rows(text, n, negative_prompt)
    if not rows:
        raise LDMKitError(f"--prompts {path} holds no prompt (blank lines and # comments are skipped); "
                          "write one prompt a line, or JSONL objects with a \"prompt\".")
    return _items(path, rows, 0 if seed is None else seed)


def _text_rows(text: str, n: int, negative_prompt: str | None) -> list[tuple[int, str, str | None, int | None, int]]:
    """(line number, prompt, negative prompt, seed or None, n) for each prompt line."""
    rows = []
    for number, raw in enumerate(text.splitlines(), 1):
        prompt = raw.strip()
        if prompt and not prompt.startswith("#"):
            rows.append((number, prompt, negative_prompt, None, n))
    return rows


def _jsonl_rows(path: str, text: str, n: int, negative_prompt: str | None) -> list:
    rows = []
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):  # no JSON value starts with #: nothing is guessed
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise LDMKitError(f"{where}: not valid JSON ({e.msg}, column {e.colno}); write one JSON object a "
                              "line, e.g. {\"prompt\": \"a red apple\", \"seed\": 7}.") from None
        if not isinstance(obj, dict):
            raise LDMKitError(f"{where}: a JSON {type(obj).__name__}, not an object; write "
                              "{\"prompt\": \"...\"} on each line.")
        _check_jsonl_object(where, obj)
        rows.append((number, obj["prompt"].strip(), obj.get("negative_prompt", negative_prompt), obj.get("seed"),
                     obj.get("n", n)))
    return rows


def _check_jsonl_object(where: str, obj: dict) -> None:
    """Refuse what would otherwise be guessed: unknown keys (a typo would be silently ignored), wrong types."""
    unknown = sorted(set(obj) - set(JSONL_KEYS))
    if unknown:
        raise LDMKitError(f"{where}: unknown key(s) {', '.join(unknown)}; the keys are {', '.join(JSONL_KEYS)}.")
    if "prompt" not in obj:
        raise LDMKitError(f"{where}: no \"prompt\"; every line needs one, e.g. {{\"prompt\": \"a red apple\"}}.")
    for key, value in obj.items():
        types = JSONL_KEYS[key]
        if not isinstance(value, types) or isinstance(value, bool):  # JSON true is no seed, though bool is an int
            kinds = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise LDMKitError(f"{where}: \"{key}\" is {json.dumps(value)}, it should be {kinds}.")
    if not obj["prompt"].strip():
        raise LDMKitError(f"{where}: the prompt is empty; write a prompt or delete the line.")
    if "n" in obj and obj["n"] < 1:
        raise LDMKitError(f"{where}: \"n\" is {obj['n']}; it is the number of images, 1 or more.")


def _items(path: str, rows: list, base: int) -> list[Item]:
    total = sum(n for *_, n in rows)
    if total > MAX_IMAGES:  # every image is listed (names, manifest) before the first is made
        raise LDMKitError(f"--prompts {path} asks for {total} images; at most {MAX_IMAGES} a run: split the file "
                          "(each part with its own -o folder).")
    if not 0 <= base <= MAX_SEED - (total - 1):  # base + index, for every index the file could give
        raise LDMKitError(f"--seed {base} is out of range for {total} images: seeds go from 0 to "
                          f"{MAX_SEED - (total - 1)}.")
    items: list[Item] = []
    for number, prompt, negative, seed, n in rows:
        first = base + len(items) if seed is None else seed
        if not 0 <= first <= MAX_SEED - (n - 1):
            raise LDMKitError(f"{path}:{number}: \"seed\" {first} is out of range for {n} image(s): seeds go "
                              f"from 0 to {MAX_SEED - (n - 1)}.")
        items += [Item(len(items) + j, number, prompt, negative, first + j) for j in range(n)]
    return items


def file_name(item: Item, total: int) -> str:
    """Fixed by the item alone (index, prompt, seed): a rerun of the same file looks for the same names."""
    width = max(5, len(str(total - 1)))
    return f"{item.index:0{width}d}-{slug(item.prompt, 40)}-{item.seed}.png"


# ------------------------------------------------------------------------------------------- what is done
def _json_round_trip(meta: dict) -> dict:
    return json.loads(json.dumps(meta, sort_keys=True))


def png_done(path: Path, expected: dict) -> bool:
    """Whether ``path`` is a sound PNG whose metadata equals ``expected``. Missing or damaged (truncated, bad
    CRC, undecodable: SIGKILL cannot hurt an atomic write, but disks and copies can) means not done; a sound
    PNG made with other settings raises, since overwriting it would lose an image the user may want."""
    if not path.exists():
        return False
    try:
        with Image.open(path) as im:
            im.verify()  # the chunks' CRCs, up to IEND
        with Image.open(path) as im:
            im.load()  # the pixel data decodes in full
            text = im.text.get("ldmkit")  # type: ignore[attr-defined]
    except Exception as e:  # noqa: BLE001  (PIL raises OSError, SyntaxError, ValueError, zlib errors...)
        logger.warning("%s is damaged (%s); making it again.", path, e)
        return False
    try:
        found = json.loads(text) if text else None
    except json.JSONDecodeError:
        found = None
    expected = _json_round_trip(expected)
    if found != expected:
        if not isinstance(found, dict):
            why = "it has no ldmkit metadata, or not as JSON"
        else:
            key = sorted(k for k in set(found) | set(expected) if k not in found or k not in expected
                         or found[k] != expected[k])[0]
            why = f"{key} is {found.get(key, '(absent)')!r} there, {expected.get(key, '(absent)')!r} now"
        raise LDMKitError(f"{path} is in the way: it was not made by this run ({why}). Give another -o folder, or "
                          "--force to replace such files.")
    return True


def todo_chunks(chunks: list[list[Item]], folder: Path, args, total: int) -> list[tuple[list[Item], set[int]]]:
    """The chunks that lack an image, each with the indices of its missing images (the others are skipped)."""
    todo = []
    for chunk in chunks:
        missing = set()
        for item in chunk:
            path = folder / file_name(item, total)
            meta = image_metadata(args, item.prompt, item.negative_prompt, item.seed)
            try:
                done = png_done(path, meta)
            except LDMKitError:
                if not args.force:
                    raise
                done = False
            if not done:
                missing.add(item.index)
        if missing:
            todo.append((chunk, missing))
    return todo


# ------------------------------------------------------------------------------------------- the run
def process_state(device: str):
    """accelerate's PartialState: under ``accelerate launch`` (or torchrun) it knows this process's rank and
    device; alone it is one process. accelerate is the ``train`` extra, so without it only one process runs.
    Without a GPU (or with --device cpu) the processes talk over gloo, as the trainer's do (training/run.py)."""
    try:
        from accelerate import PartialState
    except ImportError:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise LDMKitError("several processes were launched, but accelerate is not installed: pip install "
                              "'ldmkit[train]' (or run one process).") from None
        return None
    return PartialState(cpu=device == "cpu" or not torch.cuda.is_available())


def check_options(args) -> None:
    if args.prompt is not None:
        raise LDMKitError(f"both a prompt ({args.prompt!r}) and --prompts {args.prompts}: give one of them.")
    for given, name in ((args.from_png, "--from-png"), (args.grid, "--grid")):
        if given:
            raise LDMKitError(f"{name} does not go with --prompts; drop one of them.")
    if args.batch_size is not None and args.batch_size < 1:
        raise LDMKitError(f"--batch-size {args.batch_size}: give 1 or more images per chunk.")
    if args.n < 1:
        raise LDMKitError(f"--n {args.n}: give 1 or more images per prompt.")


def cmd_prompts(args) -> int:
    """Make every image of the prompt file that ``-o`` lacks, chunk by chunk, then write the manifest."""
    check_options(args)
    # The preset with --steps / --scheduler / --dtype on top, resolved once: every image records it, and a
    # rerun compares it with what the files hold.
    args.run_preset = run_preset(args, default_steps=50)
    args.steps, args.scheduler = args.run_preset.num_inference_steps, args.run_preset.sampler
    items = read_prompt_file(args.prompts, args.n, args.seed, args.negative_prompt)
    out = output_folder(args.output)
    size = args.batch_size or DEFAULT_BATCH_SIZE
    chunks = [items[i:i + size] for i in range(0, len(items), size)]
    todo = todo_chunks(chunks, out, args, len(items))
    state = process_state(args.device)
    if state is None:
        mine = todo
    else:
        state.wait_for_everyone()  # all have read the folder before any writes, so all hold the same to-do list
        with state.split_between_processes(todo) as part:
            mine = list(part)
    written = make_images(args, mine, out, len(items), state) if mine else 0
    if state is not None:
        state.wait_for_everyone()  # the others' images are all written
    if state is None or state.is_main_process:
        write_manifest(out, items, args)
    rank = "" if state is None or state.num_processes == 1 else f"process {state.process_index}: "
    print(f"ldmkit txt2img: {rank}{written} image(s) made, {len(items) - sum(len(m) for _, m in todo)} of "
          f"{len(items)} were already complete in {out}", file=sys.stderr)
    return 0


def make_images(args, mine: list[tuple[list[Item], set[int]]], out: Path, total: int, state) -> int:
    """Generate each chunk whole and write its missing images as soon as it is done."""
    device = args.device
    if state is not None and state.num_processes > 1 and device == "auto":
        device = state.device.type  # the launcher's choice (``--cpu``, one GPU a process), not the first GPU
        if state.device.type == "cuda":
            torch.cuda.set_device(state.device)
    preset = args.run_preset
    pipe = load_pipeline(args.model, device, preset.dtype, args.quiet)
    call = apply_preset(pipe, preset)
    sr_preset = upscale_preset(args, preset) if args.upscale else None
    sr = load_pipeline(args.upscale_model, device, sr_preset.dtype, args.quiet) if args.upscale else None
    sr_call = apply_preset(sr, sr_preset) if args.upscale else {}
    written = 0
    for chunk, missing in mine:
        seeds = [item.seed for item in chunk]
        images = pipe([item.prompt for item in chunk], negative_prompt=[item.negative_prompt or "" for item in chunk],
                      guidance_scale=args.guidance, eta=args.eta, height=args.height, width=args.width,
                      generator=generators(seeds), **call).images
        if sr is not None:
            images = sr(images, generator=generators(seeds), **sr_call).images
        for item, image in zip(chunk, images):
            if item.index in missing:
                path = out / file_name(item, total)
                for leftover in out.glob(f".{path.name}.*.tmp"):  # a SIGKILLed write's; nothing else can clean it
                    leftover.unlink(missing_ok=True)
                save_png(image, path, image_metadata(args, item.prompt, item.negative_prompt, item.seed))
                print(path, flush=True)
                written += 1
    return written


def write_manifest(out: Path, items: list[Item], args) -> Path:
    """``manifest.jsonl``: one line per image in input order (prompt, seed, file, settings), written only
    when every file it names is there."""
    lines, absent = [], []
    for item in items:
        name = file_name(item, len(items))
        if not (out / name).exists():
            absent.append(name)
        meta = image_metadata(args, item.prompt, item.negative_prompt, item.seed)
        settings = {k: v for k, v in meta.items() if k not in ("prompt", "negative_prompt", "seed")}
        lines.append(json.dumps({"index": item.index, "line": item.line, "prompt": item.prompt,
                                 "negative_prompt": item.negative_prompt, "seed": item.seed, "file": name,
                                 "settings": settings}))
    if absent:
        raise LDMKitError(f"{len(absent)} image(s) are missing from {out} (first: {absent[0]}), so no manifest "
                          "was written; run the same command again to make them.")
    path = out / MANIFEST
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------------- parser
def cmd_txt2img_any(args) -> int:
    if args.prompts is not None:
        return cmd_prompts(args)
    if args.batch_size is not None:
        raise LDMKitError("--batch-size chunks a --prompts FILE; give one, or drop --batch-size.")
    return cmd_txt2img(args)


def add_prompt_file_options(p: argparse.ArgumentParser) -> None:
    """Add --prompts and --batch-size to the txt2img parser (made in generate.py)."""
    p.add_argument("--prompts", metavar="FILE",
                   help="many prompts: one a line (# comments), or JSONL with \"prompt\" and optional \"seed\", "
                        "\"negative_prompt\", \"n\"; a rerun skips the images already complete in -o and "
                        f"writes -o/{MANIFEST}; --seed (default 0) + index seeds the lines without a seed; "
                        "runs split between the processes of `accelerate launch -m ldmkit txt2img ...`")
    p.add_argument("--batch-size", dest="batch_size", type=int,
                   help=f"with --prompts: images generated together (default {DEFAULT_BATCH_SIZE}); "
                        "bounds the memory")
    p.set_defaults(func=cmd_txt2img_any)
