"""Several tokenizers over one set of views: a named token set holds tokenizer B's
targets for exactly the dataset's views, leaves the dataset's files alone, is read by all four
readers and by stage 3 by name or fingerprint, and a wrong or tampered set is refused."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support import stage2 as helpers

from engine.config import build_config
from engine.errors import ConfigError, UserError
from shards.errors import TokenDatasetMismatch, TokenSetNotFound
from shards.inspect import summary, token_counts
from shards.manifest import seal
from shards.reader import open_token_dataset
from shards.token_sets import compare_views, resolve, token_sets
from shards.validate import validate
from shards.views import AugConfig
from tokenize_corpus.config import ClusterConfig, TokenizeConfig
from tokenize_corpus.job import tokenize
from tokenize_corpus.preflight import preflight

NAME = "b"


def config(setup: dict, out: Path, tokenizer: str, seeds=(0, 1, 2), **extra) -> TokenizeConfig:
    return TokenizeConfig(
        images=setup["images"],
        tokenizer=tokenizer,
        out_dir=str(out),
        seeds=seeds,
        aug=extra.pop("aug", AugConfig(size=32)),
        batch_size=3,
        precision="fp32",
        cluster=ClusterConfig(address=setup["address"], dashboard=False),
        **extra,
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_path, cluster2) -> dict:
    """A dataset of tokenizer A (seeds 0-2), B's token set for seeds 0-1, and B run alone."""
    root = tmp_path_factory.mktemp("token_sets")
    setup = {
        "images": helpers.make_corpus(root / "images", shards=2, per_shard=4),
        "address": cluster2,
        "a": tokenizer_path,
        "b": helpers.make_tokenizer(root / "tok_b.pth", seed=1),
    }
    dataset, alone = root / "dataset", root / "b_alone"
    assert tokenize(config(setup, dataset, setup["a"]))["exit_code"] == 0
    before = helpers.dataset_files(dataset)
    summary = tokenize(config(setup, dataset, setup["b"], seeds=(0, 1), token_set=NAME))
    assert summary["exit_code"] == 0, summary
    assert summary["next"][1].endswith(f"tokens={dataset} token_set={NAME}")
    assert tokenize(config(setup, alone, setup["b"], seeds=(0, 1)))["exit_code"] == 0
    return {**setup, "dataset": dataset, "alone": alone, "before": before}


def test_a_token_set_has_the_datasets_views_and_leaves_its_files_alone(setup) -> None:
    dataset, named = setup["dataset"], setup["dataset"] / "token_sets" / NAME
    after = helpers.dataset_files(dataset)
    # every file of the dataset is byte-identical but its card, which now lists the set
    kept = {p: b for p, b in after.items() if not p.startswith("token_sets/")}
    assert kept.keys() == setup["before"].keys()
    assert {p for p in kept if kept[p] != setup["before"][p]} == {"README.md"}
    assert "config_name: b" in after["README.md"].decode()
    # the set's token files are exactly what tokenizer B writes on its own for these seeds
    alone = helpers.dataset_files(setup["alone"])
    for path in alone:
        if path.startswith(("parquet/", "wds/", "receipts/")):
            assert (named / path).read_bytes() == alone[path], path
    manifest = json.loads((named / "manifest.json").read_text())
    default = open_token_dataset(str(dataset))
    assert manifest["token_set"] == {
        "name": NAME,
        "views_of": "../..",
        "default_fingerprint": default.fingerprint,
        "shards_compared": 2,
    }
    assert manifest["fingerprint"] != default.fingerprint
    named_ds = open_token_dataset(str(named))
    assert compare_views(default, named_ds) == []
    # same views, other targets: the tokens differ (these are what a comparison measures)
    ours, theirs = named_ds.read_shard(0), default.read_shard(0, seeds=(0, 1))
    assert all(ours[k].views == theirs[k].views for k in ours)
    assert any(not np.array_equal(ours[k].tokens, theirs[k].tokens) for k in ours)
    assert validate(str(dataset)) == []
    assert summary(default, token_counts(default))["token_sets"] == [NAME]  # pipeline inspect


def _expected(ds) -> dict:
    rows = {}
    for i in range(ds.num_shards):
        for key, row in ds.read_shard(i).items():
            for position, view in enumerate(row.views):
                rows[(key, view.seed)] = row.tokens[position].astype(np.int64)
    return rows


def _same(keys, seeds, tokens, expected) -> None:
    assert len(keys) == len(expected)
    for key, seed, toks in zip(keys, seeds, tokens, strict=True):
        assert np.array_equal(np.asarray(toks, dtype=np.int64), expected[(key, int(seed))])


def test_all_four_readers_read_each_tokenizer(setup, tmp_path, monkeypatch) -> None:
    import dask.dataframe as dd
    import datasets
    import pyarrow.dataset as pads
    import webdataset as wds

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dataset, named = setup["dataset"], setup["dataset"] / "token_sets" / NAME
    want_a = _expected(open_token_dataset(str(dataset)))
    want_b = _expected(open_token_dataset(str(named)))
    assert len(want_a) == 8 * 3 and len(want_b) == 8 * 2
    cache = str(tmp_path / "hf")
    for config_name, want in (("default", want_a), (NAME, want_b)):
        ds = datasets.load_dataset(str(dataset), config_name, split="train", cache_dir=cache)
        _same(ds["key"], ds["seed"], ds["tokens"], want)
    table = pads.dataset(str(named / "parquet"), partitioning="hive").to_table().to_pydict()
    _same(table["key"], table["seed"], table["tokens"], want_b)
    frame = dd.read_parquet(str(named / "parquet")).compute()
    _same(list(frame["key"]), list(frame["seed"]), list(frame["tokens"]), want_b)
    keys, seeds, tokens = [], [], []
    for tar in sorted((named / "wds").glob("*.tar.gz")):
        for sample in wds.WebDataset(str(tar), shardshuffle=False).decode():
            views = sample["views.json"]
            for position, seed in enumerate(views["seed"]):
                keys.append(sample["__key__"])
                seeds.append(seed)
                tokens.append(sample["tokens.npy"][position])
    _same(keys, seeds, tokens, want_b)


def test_stage_3_picks_a_set_by_name_or_fingerprint_and_refuses_others(setup) -> None:
    dataset = str(setup["dataset"])
    sets = token_sets(dataset)
    assert [s.name for s in sets] == ["default", NAME]
    b = sets[1]
    assert resolve(dataset).name == resolve(dataset, "default").name == "default"
    assert resolve(dataset, NAME).url == resolve(dataset, b.fingerprint[:8]).url == b.url
    assert resolve(dataset, sets[0].fingerprint[:12]).name == "default"
    for wrong in ("dino", b.fingerprint[:7], "0" * 12):
        with pytest.raises(TokenSetNotFound, match="it has: default .*; b "):
            resolve(dataset, wrong)
    # the reader's own check still refuses targets of another tokenizer than the model's
    with pytest.raises(TokenDatasetMismatch, match="tokenizer mismatch"):
        b.open().check(
            codebook_size=16, grid=(4, 4), image_size=32, fingerprint=sets[0].fingerprint
        )


def test_pretrain_trains_on_the_picked_set_and_refuses_a_mismatched_tokenizer(setup, tmp_path):
    from pretrain.config import PretrainConfig
    from pretrain.train import pretrain

    b = token_sets(str(setup["dataset"]))[1]

    def run(out: str, **extra):
        return pretrain(
            build_config(
                PretrainConfig,
                {
                    "tokens": str(setup["dataset"]),
                    "out_dir": str(tmp_path / out),
                    "model": {"size": "tiny", "width": 32, "depth": 1, "heads": 2},
                    "mask": {"min_patches": 4},
                    "train": {"batch_size": 4, "epochs": 1, "warmup_epochs": 0,
                              "num_workers": 0, "shuffle_buffer": 4, "device": "cpu"},
                    **extra,
                },
            )
        )  # fmt: skip

    summary = run("offline", token_set=b.fingerprint[:10])
    assert summary["tokens"] == b.url and summary["fingerprint"] == b.fingerprint
    assert summary["steps"] == 2 and 0.0 <= summary["mim_acc"] <= 1.0
    import yaml

    saved = yaml.safe_load((tmp_path / "offline" / "config.yaml").read_text())
    assert saved["token_set"] == b.fingerprint[:10]
    # online targets from tokenizer A against B's stored targets: refused before training
    with pytest.raises(TokenDatasetMismatch, match="tokenizer mismatch"):
        run("online", token_set=NAME, targets="online", tokenizer=setup["a"])


def test_stage_2_refuses_a_set_that_cannot_share_the_views(setup, tmp_path) -> None:
    dataset = setup["dataset"]
    cases = {
        "augmentation": {"aug": AugConfig(size=32, flip=False)},
        r"seeds \[7\] are not views": {"seeds": (0, 7)},
        "lower-case": {"token_set": "Default"},
        "not 'default'": {"token_set": "default"},
    }
    for message, change in cases.items():
        extra = {"token_set": "c", **change}
        seeds = extra.pop("seeds", (0, 1))
        with pytest.raises(UserError, match=message):
            preflight(config(setup, dataset, setup["b"], seeds=seeds, **extra))
    other = dict(setup, images=helpers.make_corpus(tmp_path / "other", shards=2, per_shard=4))
    with pytest.raises(ConfigError, match="is not the dataset's image source"):
        preflight(config(other, dataset, setup["b"], seeds=(0,), token_set="c"))
    with pytest.raises(ConfigError, match="Run stage=tokenize without token_set first"):
        preflight(config(setup, tmp_path / "empty", setup["b"], token_set="c"))
    assert not (dataset / "token_sets" / "c").exists()


def _rewrite_consistently(named: Path, relative: str, table: pa.Table) -> None:
    """An adversary's edit: replace a token file and fix its receipt and the manifest (and its
    seal) to match."""
    target = named / relative
    pq.write_table(table, target)
    data = target.read_bytes()
    entry = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    for path in (named / "manifest.json", *sorted((named / "receipts").glob("*.json"))):
        doc = json.loads(path.read_text())
        receipts = doc.get("shards", [doc])
        for receipt in receipts:
            for file in receipt["files"]:
                if file["path"] == relative:
                    file.update(entry)
        path.write_text(json.dumps(seal(doc) if path.name == "manifest.json" else doc))


def test_a_tampered_or_foreign_set_is_caught(setup, tmp_path) -> None:
    dataset = tmp_path / "copy"
    shutil.copytree(setup["dataset"], dataset)
    named = dataset / "token_sets" / NAME
    # 1. views edited in a set whose hashes were fixed up: validate names the image
    relative = "parquet/seed=0/train-00000-of-00002.parquet"
    table = pq.read_table(named / relative)
    tops = table.column("top").to_pylist()
    tops[1] += 1
    table = table.set_column(table.schema.get_field_index("top"), "top", pa.array(tops, pa.int32()))
    _rewrite_consistently(named, relative, table.replace_schema_metadata(table.schema.metadata))
    problems = validate(str(dataset))  # the set's WebDataset copy disagrees with its Parquet
    assert problems == [
        "token set b: shard 0: Parquet and WebDataset differ at key 's0_001': views (top)"
    ]
    default = open_token_dataset(str(dataset))
    assert compare_views(default, open_token_dataset(str(named))) == [
        "shard 0: key 's0_001': other views (top) than the dataset's"
    ]
    # 2. a set tokenized from other views (another augmentation) dropped into the folder
    foreign = dataset / "token_sets" / "foreign"
    assert tokenize(config(setup, foreign, setup["b"], seeds=(0,), aug=AugConfig(size=32, flip=False)))[
        "exit_code"
    ] == 0  # fmt: skip
    with pytest.raises(
        TokenDatasetMismatch, match="does not share the dataset's views: augmentation"
    ):
        resolve(str(dataset), "foreign")
    assert any(p.startswith("token set foreign: augmentation") for p in validate(str(dataset)))
    # 3. a set's token file swapped for the default set's file of the same shard and seed
    shutil.copy(dataset / relative, named / relative)
    assert any("token set b: shard 0" in p for p in validate(str(dataset)))


def test_the_cli_names_the_sets_when_the_pick_is_wrong(setup, tmp_path) -> None:
    import subprocess

    from support import cli_runs

    done = subprocess.run(
        [*cli_runs.pipeline_command(), "run", "stage=pretrain", f"tokens={setup['dataset']}",
         "token_set=dino", f"out_dir={tmp_path / 'run'}", "train.device=cpu"],
        env=cli_runs.environment(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "token_set=dino names no token set" in done.stderr and "it has: default" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_report_shows_the_tokenizers_side_by_side(setup, tmp_path) -> None:
    from pipeline.report.command import write_report
    from pipeline.report.tokens import perplexity

    page = write_report(setup["dataset"], out=tmp_path / "report")
    text = page.read_text()
    assert "Tokenizers on the same views" in text and "Not available" not in text
    for s in token_sets(str(setup["dataset"])):
        counts = token_counts(s.open())
        used = int((counts > 0).sum())
        p = counts[counts > 0] / counts.sum()
        worth = float(np.exp(-(p * np.log(p)).sum()))  # perplexity, computed independently
        assert f"<code>{s.fingerprint[:12]}</code></td><td>{s.seeds}</td><td>{used} / 16" in text
        assert f"{worth:.1f}</td>" in text and perplexity(summary(s.open(), counts)) > 1.0
    assert (page.parent / "token-sets-dataset.png").is_file()
    # a dataset without token sets has no such section
    alone = write_report(setup["alone"], out=tmp_path / "alone").read_text()
    assert "Tokenizers on the same views" not in alone


def test_growing_the_dataset_keeps_its_sets_and_a_set_grows_the_same_way(setup, tmp_path) -> None:
    dataset = tmp_path / "grow"
    shutil.copytree(setup["dataset"], dataset)
    named = dataset / "token_sets" / NAME
    before = helpers.dataset_files(named)
    # the dataset gets seed 3: its set is untouched, and its card still lists the set
    assert tokenize(config(setup, dataset, setup["a"], seeds=(0, 1, 2, 3)))["exit_code"] == 0
    assert helpers.dataset_files(named) == before
    assert "config_name: b" in (dataset / "README.md").read_text()
    # the set gets seed 2 with the same command: only the new seed is computed, views compared
    summary = tokenize(config(setup, dataset, setup["b"], seeds=(0, 1, 2), token_set=NAME))
    assert summary["exit_code"] == 0 and summary["views_this_run"] == 8, summary
    grown = open_token_dataset(str(named))
    assert grown.seeds == (0, 1, 2) and grown.manifest["versions"][-1]["added"]["seeds"] == [2]
    assert compare_views(open_token_dataset(str(dataset)), grown) == []
    after = helpers.dataset_files(named)
    assert all(after[p] == before[p] for p in before if p.startswith("parquet/"))


def test_the_closing_lines_name_the_sets_folder_and_how_to_pick_it(setup) -> None:
    from pipeline.guide import closing_lines

    named = setup["dataset"] / "token_sets" / NAME
    cfg = config(setup, setup["dataset"], setup["b"], seeds=(0, 1), token_set=NAME)
    text = closing_lines("tokenize", cfg, {"out_dir": str(named), "exit_code": 0})
    wrote, follow = text.split("next:")
    assert f"  {named}/manifest.json" in wrote and f"  {named}/ (" in wrote
    assert f"pipeline inspect {named} " in follow
    assert f"tokens={setup['dataset']} token_set={NAME} " in follow


def test_shard_size_matters_only_for_folder_sources() -> None:
    from shards.token_sets import manifest_problems

    def manifest(kind: str, shard_size: int) -> dict:
        images = {"source": "/images", "shard_size": shard_size, "kind": kind}
        return {"aug": {"size": 32}, "seeds": [0, 1], "images": images, "num_shards": 2}

    assert manifest_problems(manifest("tar", 256), manifest("tar", 64)) == []
    assert manifest_problems(manifest("folder", 256), manifest("folder", 256)) == []
    assert manifest_problems(manifest("folder", 256), manifest("folder", 64)) == [
        "shard_size=64 cuts the folder into other shards than the dataset's 256"
    ]
