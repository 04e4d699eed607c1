"""The dataset card (README.md) of a token dataset: a Hugging Face YAML header + a human description.

The header's ``configs`` entry points ``datasets.load_dataset(<dir>)`` at the Parquet files and its
``dataset_info.features`` spells the columns, so the card alone tells another team how to read the
dataset without this project (docs/design.md §3, docs/token-dataset.md §5).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import pyarrow as pa
import yaml

from shards import schema

COLUMN_DOCS = {
    schema.KEY: "image key, unique within the image source (same as the image shard's key)",
    schema.LABEL: "class index, -1 when unknown",
    schema.SEED: "augmentation seed of this view (also the Hive partition `seed=<k>`)",
    schema.IMAGE_SHA256: "sha256 (32 raw bytes) of the image's stored bytes, before decode",
    schema.TOKENS: "visual token ids of the view, row-major over the tokenizer's patch grid",
    schema.WIDTH: "original image width after EXIF transpose",
    schema.HEIGHT: "original image height after EXIF transpose",
    schema.TOP: "crop box top, original pixels",
    schema.LEFT: "crop box left, original pixels",
    schema.CROP_HEIGHT: "crop box height, original pixels",
    schema.CROP_WIDTH: "crop box width, original pixels",
    schema.FLIP: "horizontal flip applied",
    schema.BRIGHTNESS: "colour-jitter brightness factor (1.0 = unchanged)",
    schema.CONTRAST: "colour-jitter contrast factor (1.0 = unchanged)",
    schema.SATURATION: "colour-jitter saturation factor (1.0 = unchanged)",
    schema.JITTER_ORDER: 'order of jitter ops (0 brightness, 1 contrast, 2 saturation), e.g. "0,2,1"; "" = none',
    schema.SIZE: "output view side in pixels",
    schema.INTERPOLATION: "resize interpolation (bicubic or bilinear)",
}

# The consumer's recipe: rebuild the pixels of a row and check the image digest with
# Pillow + torchvision only. It restates shards.decode.decode_image and shards.views.render_view in
# the reference's order (jitter on the whole image -> flip -> crop -> resize); a test runs this
# very text, taken from a rendered card, with the project's packages blocked, and compares the
# bytes with render_view's.
RECIPE_MARKER = "# Rebuild the exact pixels of one row, without this project."
RECIPE = f"""{RECIPE_MARKER}
import hashlib
import io

import numpy as np
import torchvision.transforms.functional as F
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode


def decode(data):
    \"\"\"Image bytes -> RGB PIL image, as stage 2 decoded it.\"\"\"
    img = Image.open(io.BytesIO(data))
    img.load()
    try:
        img = ImageOps.exif_transpose(img)  # sizes are after EXIF orientation
    except Exception:
        pass  # a broken EXIF block: keep the stored orientation
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":  # 16/32-bit or float greyscale -> 8 bits
        if mode.startswith("I;16"):
            arr = np.asarray(img).astype(np.float64) / 257.0
        elif mode == "F":
            arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
            if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
                arr = arr * 255.0
        else:
            arr = np.asarray(img.convert("I")).astype(np.float64)
            if arr.size and (arr.min() < 0 or arr.max() > 255):
                arr = np.clip(arr, 0, 65535) / 257.0
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if "A" in img.getbands() or "a" in mode or "transparency" in img.info:
        rgba = img.convert("RGBA")  # alpha is composited on white, never dropped
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def rebuild_view(data, row):
    \"\"\"Image bytes + one row (a dict of the columns) -> uint8 tensor [3, size, size].\"\"\"
    img = decode(data)
    assert img.size == (row["width"], row["height"]), "not the image this row was made from"
    # 1. colour jitter on the WHOLE image, in jitter_order ("0,2,1": brightness, saturation,
    #    contrast; "" = none); contrast blends towards the whole image's mean grey
    ops = {{0: F.adjust_brightness, 1: F.adjust_contrast, 2: F.adjust_saturation}}
    factors = {{0: row["brightness"], 1: row["contrast"], 2: row["saturation"]}}
    for op in [int(i) for i in row["jitter_order"].split(",") if i]:
        img = ops[op](img, factors[op])
    # 2. horizontal flip of the whole image
    if row["flip"]:
        img = F.hflip(img)
    # 3. the crop box, in pixels of the (flipped) full image: when flip is true, `left` counts
    #    from the left edge of the FLIPPED image; 4. resize the crop to size x size
    mode = {{"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}}
    img = F.resized_crop(
        img,
        row["top"],
        row["left"],
        row["crop_height"],
        row["crop_width"],
        [row["size"], row["size"]],
        mode[row["interpolation"]],
    )
    return F.pil_to_tensor(img)  # uint8 [3, size, size]; the student normalises it with the
    # ImageNet mean/std, the tokenizer reads it / 255


def image_digest_ok(data, row):
    \"\"\"Are these the image bytes the row was made from? (sha256 of the bytes as stored.)\"\"\"
    stored = row["{schema.IMAGE_SHA256}"]  # Parquet: 32 raw bytes; WebDataset: 64 hex characters
    digest = hashlib.sha256(data)
    return digest.digest() == stored if isinstance(stored, bytes) else digest.hexdigest() == stored
"""


def hf_features(num_tokens: int) -> list[dict]:
    """The columns as a Hugging Face ``dataset_info.features`` YAML list."""
    features = []
    for field in schema.arrow_schema(num_tokens):
        if pa.types.is_fixed_size_list(field.type):
            features.append(
                {
                    "name": field.name,
                    "list": str(field.type.value_type),
                    "length": field.type.list_size,
                }
            )
        elif pa.types.is_fixed_size_binary(field.type):
            features.append({"name": field.name, "dtype": "binary"})
        else:
            dtype = {"bool": "bool", "double": "float64", "float": "float32"}.get(
                str(field.type), str(field.type)
            )
            features.append({"name": field.name, "dtype": dtype})
    return features


def _token_sets_text(manifest: dict, names: Sequence[str]) -> str:
    """The card's lines about token sets: which this dataset holds, or which one it is."""
    own = manifest.get("token_set")
    if own:
        return (
            f"- token set `{own.get('name')}` of the dataset at `{own.get('views_of')}`: the same "
            f"views as its default set (tokenizer `{str(own.get('default_fingerprint'))[:12]}`), "
            "tokenized by the tokenizer above\n"
        )
    if not names:
        return ""
    listed = ", ".join(f"`{n}`" for n in names)
    return (
        f"- token sets (other tokenizers' targets for these same views): {listed}, each a whole "
        f"token dataset under `{schema.TOKEN_SETS_DIR}/<name>/`; "
        '`datasets.load_dataset(<dir>, "<name>")` reads one\n'
    )


def render_card(manifest: dict, token_sets: Sequence[str] = ()) -> str:
    """The README.md text for ``manifest`` (deterministic); ``token_sets``: its named sets' names.

    Each named token set (``shards.token_sets``) is one more ``datasets`` config, so
    ``datasets.load_dataset(<dir>, "<name>")`` reads that tokenizer's targets.
    """
    num_tokens = int(manifest.get("num_tokens") or 0)
    totals = manifest.get("totals", {})
    configs = [
        {"config_name": "default", "data_files": [{"split": "train", "path": schema.PARQUET_GLOB}]}
    ]
    for name in token_sets:
        path = f"{schema.TOKEN_SETS_DIR}/{name}/{schema.PARQUET_GLOB}"
        configs.append({"config_name": name, "data_files": [{"split": "train", "path": path}]})
    header = {
        "configs": configs,
        "dataset_info": {"features": hf_features(num_tokens)},
        "tags": ["beit-v2", "visual-tokens", "vq-kd"],
    }
    grid = manifest.get("grid")
    seeds = manifest.get("seeds", [])
    columns = "\n".join(f"| `{name}` | {COLUMN_DOCS[name]} |" for name in schema.COLUMNS)
    tokenizer = json.dumps(manifest.get("tokenizer"), indent=1, sort_keys=True)
    bpt = {k: round(v, 3) for k, v in (totals.get("bytes_per_token") or {}).items() if v}
    first_wds = schema.wds_path(0)
    return f"""---
{yaml.safe_dump(header, sort_keys=False).strip()}
---

# Visual tokens for BEiT v2 pretraining

Precomputed VQ-KD visual tokens: for every image of the source and each of {len(seeds)} augmentation
seeds {seeds}, the token ids ({num_tokens} per view, grid {grid}, codebook size
{manifest.get("codebook_size")}) of one augmented view, together with the exact parameters of that
view, so a pretraining run rebuilds the same pixels from the original image instead of running the
tokenizer (schema version {manifest.get("schema_version")}).

- images: {totals.get("images")} in {manifest.get("num_shards")} shards ({totals.get("skipped")} skipped, listed per shard in `manifest.json`)
- image source: `{json.dumps(manifest.get("images"))}`
- teacher: `{manifest.get("teacher")}`; precision: `{manifest.get("precision")}`
- augmentation: `{json.dumps(manifest.get("aug"), sort_keys=True)}`
- bytes on disk per token: `{json.dumps(bpt, sort_keys=True)}`
- missing shards: {manifest.get("missing_shards") or "none"}
{_token_sets_text(manifest, token_sets)}
## How it was made

Each image is decoded once (EXIF transpose, RGB); each seed's view parameters are a pure function
of (augmentation config, key, seed); colour jitter applies to the whole image, then the flip, the
crop box and the resize. The tokenizer encodes the view and the ids are stored as `uint16`.
Tokenizer (fingerprint = sha256 of its weights):

```json
{tokenizer}
```

## Layout

- `manifest.json`: provenance, software versions, per-shard receipts with sha256 of every file
- `parquet/seed=<k>/train-<i>-of-<n>.parquet`: one file per (seed, image shard), Hive-partitioned by seed
- `wds/tokens-<i>.tar.gz`: WebDataset shard aligned 1:1 with image shard `i` (same keys, same
  order); one sample per image: `<key>.tokens.npy` (uint16 [seeds, tokens]), `<key>.views.json`
  (view columns as lists over seeds), `<key>.cls`
- `receipts/shard-<i>.json`: written last; a shard without one is not done

## Columns

| column | meaning |
|---|---|
{columns}

## Reading it

```python
import datasets
ds = datasets.load_dataset("path/to/tokens", split="train")

import pyarrow.dataset as pads
table = pads.dataset("path/to/tokens/parquet", partitioning="hive").to_table()

import dask.dataframe as dd
df = dd.read_parquet("path/to/tokens/parquet")

import webdataset as wds
for sample in wds.WebDataset("path/to/tokens/{first_wds}", shardshuffle=False).decode():
    tokens = sample["{schema.WDS_TOKENS}"]  # uint16 [seeds, tokens]
```

Check it with `pipeline validate <dir> [images=<image source>]`.

## Rebuilding the pixels of a row (Pillow and torchvision only)

A row holds what is needed to rebuild its view bit for bit from the original image:

1. The image bytes are the ones stage 2 read, exactly as stored in the image source (the file's
   contents, the tar member's payload, the Parquet `image.bytes` cell). `image_sha256` is their
   sha256 (Parquet: 32 raw bytes; WebDataset `<key>.sha256`: 64 hex characters): check it first,
   a mismatch means other pixels.
2. Decode with Pillow: load, apply the EXIF orientation (`width`/`height` are after it), convert
   to RGB; a mode with alpha is composited on white (never dropped); 16-bit, 32-bit and float
   greyscale is scaled to 8 bits.
3. Colour jitter on the whole image, in `jitter_order` (0 brightness, 1 contrast, 2 saturation:
   torchvision's `adjust_brightness` / `adjust_contrast` / `adjust_saturation`, i.e. Pillow's
   `ImageEnhance` with the stored factors; contrast uses the mean grey of the whole image).
4. Horizontal flip of the whole image when `flip` is true.
5. Crop the box (`top`, `left`, `crop_height`, `crop_width`) in pixels of the full image after
   the flip: with `flip`, `left` counts from the left edge of the flipped image.
6. Resize the crop to `size` x `size` with `interpolation` (Pillow's filter, as torchvision's
   `resized_crop` on a PIL image does).

The same steps as code (Pillow, numpy, torchvision; the same Pillow version gives the same bytes):

```python
{RECIPE}

import pyarrow.parquet as pq
table = pq.read_table("path/to/tokens/{schema.parquet_path(0, 0, int(manifest.get("num_shards") or 1))}")
row = table.slice(0, 1).to_pylist()[0]
data = open("path/to/images/<the file of row['key']>", "rb").read()
assert image_digest_ok(data, row)
pixels = rebuild_view(data, row)  # uint8 [3, size, size]; row["tokens"] are its visual tokens
```
"""
