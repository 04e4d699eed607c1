"""Stage 2 driver: tokenize image shards at K view seeds on Dask into a token dataset.

``pipeline run stage=tokenize images=<shards> tokenizer=<ckpt> out_dir=<dir>`` runs
:func:`tokenize` (docs/design.md §2-§4). In order:

1. **Preflight** (``tokenize_corpus.preflight``): every setting, the image source and the
   tokenizer (read from its checkpoint, no model built) are checked before a cluster starts.
2. **Lock** ``out_dir`` (``shards.dataset.TokenDatasetDir.lock``): a second run into the same
   directory is refused while this one writes.
3. **Resume** (``tokenize_corpus.resume``): receipts of another job are refused; shards whose
   images or token files changed are redone; the rest are kept.
4. **Run** one Dask task per remaining shard (``tokenize_corpus.cluster``,
   ``tokenize_corpus.shard_task``), then assemble ``manifest.json`` from the receipts.

A run that fails leaves ``out_dir`` reusable: rerunning the same (or the corrected) command
keeps what still matches and redoes the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import Any

import yaml

from engine.config import to_dict
from shards.dataset import TokenDatasetDir
from shards.errors import DataIntegrityError
from shards.manifest import build_manifest
from shards.reader import TokenDataset, open_token_dataset
from shards.schema import MANIFEST_NAME
from shards.storage import dumps
from shards.token_sets import compare_views, views_record
from tokenize_corpus.append import VERSIONS_NAME, next_versions
from tokenize_corpus.cluster import cluster_precision, open_client, run_tasks, set_dask_logging
from tokenize_corpus.config import TokenizeConfig
from tokenize_corpus.identity import job_identity
from tokenize_corpus.preflight import Preflight, preflight
from tokenize_corpus.resume import ResumePlan, plan_resume
from tokenize_corpus.worker import ShardJob

__all__ = ["tokenize"]

log = logging.getLogger(__name__)


def _job(cfg: TokenizeConfig, pre: Preflight, precision: str, identity: dict) -> ShardJob:

    return ShardJob(
        out_dir=pre.out_dir,
        num_shards=len(pre.shards),
        seeds=tuple(cfg.seeds),
        aug=cfg.aug,
        formats=tuple(cfg.formats),
        batch_size=cfg.batch_size,
        precision=precision,
        tokenizer=pre.tokenizer_path,
        fingerprint=pre.tokenizer["fingerprint"],
        device=cfg.cluster.device,
        threads=cfg.cluster.threads_per_worker,
        identity=identity,
    )


def tokenize(cfg: TokenizeConfig) -> dict:
    """Stage 2 run function: tokenize ``cfg.images`` into the token dataset ``cfg.out_dir``.

    Returns a summary: shards done/failed (with reasons), images, skips, views, paths and the
    commands to run next; its ``exit_code`` is 1 when a shard failed (rerun the same command to
    redo only those). User mistakes raise ``engine.errors.UserError`` subclasses (exit 2).
    """

    start = time.perf_counter()
    set_dask_logging(cfg.log_level)
    log.info("stage 2: checking settings, images and tokenizer")
    pre = preflight(cfg)
    log.info(
        "%d image shards (%s), tokenizer %s (%d codes, %dx%d grid)",
        len(pre.shards),
        pre.shards[0].kind,
        pre.tokenizer["fingerprint"][:12],
        pre.tokenizer["codebook_size"],
        *pre.tokenizer["grid"],
    )
    dataset = TokenDatasetDir(pre.out_dir)
    with dataset.lock(), contextlib.ExitStack() as stack:
        client = None
        precision = pre.precision
        if precision is None:  # an external cluster: ask its workers (nothing is started)
            client = stack.enter_context(open_client(cfg.cluster, cfg.log_level))
            precision = cluster_precision(cfg.precision, cfg.cluster.device, client)
        summary = _run(cfg, pre, dataset, precision, client, stack)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    _log_summary(summary)
    return summary


def _run(
    cfg: TokenizeConfig,
    pre: Preflight,
    dataset: TokenDatasetDir,
    precision: str,
    client: Any,
    stack: contextlib.ExitStack,
) -> dict:
    """Resume, run the tasks (starting a LocalCluster only when there is work), finish."""

    identity = job_identity(
        pre.tokenizer["fingerprint"], cfg.aug, tuple(cfg.seeds), precision, tuple(cfg.formats)
    )
    plan = plan_resume(dataset, pre.shards, identity)
    dataset.write_config(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    log.info(
        "%d image shards: %d already done, %d to tokenize at precision %s",
        len(pre.shards),
        len(plan.kept),
        len(plan.todo),
        precision,
    )
    results: dict[int, dict] = {}
    failed: dict[int, str] = {}
    run_seconds = 0.0
    if plan.todo or plan.renumber:
        # The dataset is incomplete until every shard is done: withdraw the manifest, rename the
        # kept files to the new shard count, and clear what the kept receipts do not list
        # (redone shards, partial files, an older layout).
        dataset.withdraw_manifest()
        dataset.remove_partial_files()
        for index in sorted(plan.renumber):
            group = plan.extend if index in plan.extend else plan.kept
            group[index] = dataset.renumber(group[index], len(pre.shards))
        dataset.remove_orphans([*plan.kept.values(), *plan.extend.values()], len(pre.shards))
    if plan.todo:
        if client is None:
            client = stack.enter_context(open_client(cfg.cluster, cfg.log_level))
            # the workers run the precision the driver resolved (same machine) or say why not
            cluster_precision(precision, cfg.cluster.device, client)
        job = _job(cfg, pre, precision, identity)
        results, failed, run_seconds = run_tasks(
            client, plan.todo, job, cfg.cluster.retries, cfg.cluster.dashboard, plan.extend
        )
    return _finish(cfg, pre, dataset, plan, precision, results, failed, run_seconds)


def _finish(
    cfg: TokenizeConfig,
    pre: Preflight,
    dataset: TokenDatasetDir,
    plan: ResumePlan,
    precision: str,
    results: dict[int, dict],
    failed: dict[int, str],
    run_seconds: float,
) -> dict:
    """Summary of the run; the manifest when every shard is done."""

    receipts = [
        results[s.index]["receipt"] if s.index in results else plan.kept[s.index]
        for s in pre.shards
        if s.index not in failed
    ]
    num_shards = len(pre.shards)
    images = sum(r["rows"] for r in receipts)
    summary: dict[str, Any] = {
        "out_dir": pre.out_dir,
        "shards": num_shards,
        "shards_tokenized": len(results),
        "shards_already_done": len(plan.kept),
        "shards_redone": {_name(i): why for i, why in sorted(plan.redo.items())},
        "shards_extended": len(plan.extend),
        "shards_failed": len(failed),
        "images": images,
        "images_skipped": sum(len(r["skipped"]) for r in receipts),
        "views": images * len(cfg.seeds),
        "views_this_run": sum(r["views"] for r in results.values()),
        "precision": precision,
        # Timings of this run's tasks (for benchmarks): submit-to-last-result wall time, summed
        # task time, the tokenizer-forward part of it, and the largest worker peak memory.
        "run_seconds": round(run_seconds, 3),
        "task_seconds": round(sum(r["seconds"] for r in results.values()), 3),
        "encode_seconds": round(sum(r["encode_seconds"] for r in results.values()), 3),
        "worker_peak_rss_mb": max((r["peak_rss_mb"] for r in results.values()), default=None),
    }
    if failed:
        summary["failed"] = {_name(i): failed[i] for i in sorted(failed)}
        summary["exit_code"] = 1
        summary["message"] = (
            f"{len(failed)} of {num_shards} shards failed (see 'failed'); fix them and rerun the "
            "same command: finished shards are kept and only these are redone"
        )
        summary["next"] = [_command(cfg)]
        return summary

    identity = receipts[0]["job"] if receipts else None
    previous = next(iter(plan.extend.values()), None)
    versions = next_versions(dataset, list(cfg.seeds), num_shards, identity, previous)
    info = {
        "tokenizer": pre.tokenizer,
        "tokenizer_source": pre.tokenizer_path,
        "teacher": pre.tokenizer.get("teacher"),
        "aug": dataclasses.asdict(cfg.aug),
        "seeds": list(cfg.seeds),
        "precision": precision,
        "images": {"source": pre.images, "shard_size": cfg.shard_size, "kind": pre.shards[0].kind},
        "num_shards": num_shards,
        "identity": identity,
        "versions": versions,
    }
    if pre.dataset_root:
        problems = _shares_views(pre, cfg.token_set, receipts, info)
        if problems:
            summary["exit_code"] = 1
            summary["message"] = (
                f"token set {cfg.token_set} does not have the views of {pre.dataset_root} (did "
                f"the dataset change while this ran?): {'; '.join(problems[:5])}; rerun the "
                "same command"
            )
            summary["next"] = [_command(cfg)]
            return summary
    if results or plan.renumber or dataset.manifest() is None:
        # a worker killed mid-write (Dask reran its task elsewhere) leaves a temporary file
        dataset.remove_partial_files()
        dataset.write_bytes(VERSIONS_NAME, dumps(versions))
        dataset.write_manifest(receipts, info)
    summary["manifest"] = dataset.url_of(MANIFEST_NAME)
    summary["exit_code"] = 0
    root = pre.dataset_root or pre.out_dir
    pick = f" token_set={cfg.token_set}" if cfg.token_set else ""
    summary["next"] = [
        f"pipeline validate {root} 'images={pre.images}'",
        f"pipeline run stage=pretrain 'images={pre.images}' tokens={root}{pick}",
    ]
    if pre.dataset_root:
        TokenDatasetDir(pre.dataset_root).refresh_card()  # the dataset's card lists its token sets
    return summary


def _shares_views(pre: Preflight, name: str, receipts: list[dict], info: dict) -> list[str]:
    """Compare a named token set's rows with its dataset's views; on success record it in ``info``."""

    try:
        default = open_token_dataset(pre.dataset_root)
        named = TokenDataset(pre.out_dir, build_manifest(receipts, info))
        problems = compare_views(default, named)
    except DataIntegrityError as err:
        return [str(err)]
    if not problems:
        info["token_set"] = views_record(name, default, named)
    return problems


def _name(index: int) -> str:
    return f"shard-{index:06d}"


def _command(cfg: TokenizeConfig) -> str:
    pick = f" token_set={cfg.token_set}" if cfg.token_set else ""
    return (
        f"pipeline run stage=tokenize 'images={cfg.images}' tokenizer={cfg.tokenizer} "
        f"out_dir={cfg.out_dir}{pick} ..."
    )


def _log_summary(summary: dict) -> None:
    if summary["exit_code"]:
        log.error(summary["message"])
        return
    log.info(
        "token dataset at %s: %d images x %d views = %d views (%d shards: %d tokenized now, %d "
        "kept, %d images skipped), precision %s, %.1f s",
        summary["out_dir"],
        summary["images"],
        summary["views"] // max(1, summary["images"]),
        summary["views"],
        summary["shards"],
        summary["shards_tokenized"],
        summary["shards_already_done"],
        summary["images_skipped"],
        summary["precision"],
        summary["seconds"],
    )
    for command in summary["next"]:
        log.info("next: %s", command)
