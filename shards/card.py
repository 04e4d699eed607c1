"""The dataset card (README.md) of a token dataset: a Hugging Face YAML header + a human description.

The header's ``configs`` entry points ``datasets.load_dataset(<dir>)`` at the Parquet files and its
``dataset_info.features`` spells the columns, so the card alone tells another team how to read the
dataset without this project (docs/design.md §1, §3).
"""

from __future__ import annotations

import json

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


def render_card(manifest: dict) -> str:
    """The README.md text for ``manifest`` (deterministic)."""
    num_tokens = int(manifest.get("num_tokens") or 0)
    totals = manifest.get("totals", {})
    header = {
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": "train", "path": schema.PARQUET_GLOB}],
            }
        ],
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
"""
