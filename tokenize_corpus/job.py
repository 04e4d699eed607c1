"""Stage 2 driver: tokenize image shards at K view seeds on Dask into a token dataset.

``pipeline run stage=tokenize images=<shards> tokenizer=<ckpt> out_dir=<dir>`` runs
:func:`tokenize`: preflight (``tokenize_corpus.preflight``), the lock on ``out_dir``, the resume
plan (``tokenize_corpus.resume``), one Dask task per remaining shard (``tokenize_corpus.cluster``,
``tokenize_corpus.shard_task``), then ``manifest.json`` from the receipts. The order and what
each step promises are docs/design.md §4.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from engine.config import config_text
from engine.errors import ConfigError
from engine.lock import hold
from shards.dataset import TokenDatasetDir
from shards.errors import DataIntegrityError
from shards.images import source_keys
from shards.manifest import build_manifest
from shards.reader import TokenDataset, open_token_dataset
from shards.schema import MANIFEST_NAME
from shards.storage import dumps
from shards.token_sets import compare_views, views_record
from tokenize_corpus.append import VERSIONS_NAME, next_versions
from tokenize_corpus.batch import make_cluster
from tokenize_corpus.cluster import (
    ClusterLost,
    DaskCluster,
    check_receipts,
    cluster_precision,
    log_dir,
    run_tasks,
    set_dask_logging,
)
from tokenize_corpus.config import TokenizeConfig
from tokenize_corpus.identity import job_identity, view_facts
from tokenize_corpus.preflight import Preflight, absolute_path, check_values, preflight
from tokenize_corpus.resume import ResumePlan, check_job_identity, plan_resume
from tokenize_corpus.worker import ShardJob

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
        threads=cfg.cluster.torch_threads,
        identity=identity,
    )


def tokenize(cfg: TokenizeConfig) -> dict:
    """Stage 2 run function: tokenize ``cfg.images`` into the token dataset ``cfg.out_dir``.

    Returns a summary: shards done/failed (with reasons), images, skips, views, paths and the
    commands to run next; its ``exit_code`` is 1 when a shard failed or no worker could be had
    (rerun the same command to redo only what is missing). User mistakes raise
    ``engine.errors.UserError`` subclasses (exit 2) before anything is written or submitted.
    """
    start = time.perf_counter()
    set_dask_logging(cfg.log_level)
    check_values(cfg)
    logs = log_dir(cfg.cluster, absolute_path(cfg.out_dir))
    # slurm-runner: only rank 1 of the srun step gets past this line (the others serve).
    with DaskCluster(cfg.cluster, logs, cfg.log_level) as cluster:
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
        # one key, one image: a key an earlier shard has is skipped (docs/design.md §4, step 1)
        keys = source_keys(pre.shards)
        pre = dataclasses.replace(pre, shards=keys.shards)
        dataset = TokenDatasetDir(pre.out_dir)
        with hold(pre.out_dir):
            try:
                summary = _run(cfg, pre, dataset, cluster)
            except ClusterLost as lost:
                summary = _lost(cfg, pre, str(lost))
    summary["keys_renamed"] = len(keys.renamed)  # names the key rule changed (shards.images)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    _log_summary(summary)
    return summary


def print_job_script(cfg: TokenizeConfig) -> str:
    """The worker job script a ``cluster.kind=slurm|pbs`` run would submit (nothing is).

    ``pipeline run stage=tokenize ... --print-job-script`` prints it; neither ``sbatch`` nor
    ``qsub`` is needed for that.
    """
    check_values(cfg, submitting=False)
    if not cfg.cluster.batch:
        raise ConfigError(
            f"--print-job-script shows the worker job script of cluster.kind=slurm or pbs; this "
            f"run has cluster.kind={cfg.cluster.effective_kind}, which submits no job"
        )
    logs = log_dir(cfg.cluster, absolute_path(cfg.out_dir))
    created = [p for p in (Path(logs), Path(logs).parent) if not p.exists()]
    try:
        with make_cluster(cfg.cluster, logs, dashboard=False) as jq:
            return jq.job_script()
    finally:
        for folder in created:  # dask-jobqueue makes the log folder: printing leaves no trace
            with contextlib.suppress(OSError):
                folder.rmdir()


def _run(
    cfg: TokenizeConfig, pre: Preflight, dataset: TokenDatasetDir, cluster: DaskCluster
) -> dict:
    """Check the finished shards (on the workers), run the rest, finish."""
    receipts = dataset.receipts()
    # Refuse another job's directory before anything starts. The precision is part of the job's
    # identity; unless it is explicit or resolved here, the workers resolve it, and it is
    # compared once they have.
    known = pre.precision or (None if cfg.precision == "auto" else cfg.precision)
    identity = _identity(cfg, pre, known or "")
    check_job_identity(dataset, receipts, identity, skip=() if known else ("precision",))
    precision = cluster_precision(known or cfg.precision, cfg.cluster.device, cluster)
    if known is None:
        identity = _identity(cfg, pre, precision)
        check_job_identity(dataset, receipts, identity)
    verdicts = check_receipts(cluster, dataset, pre.shards, receipts)
    plan = plan_resume(pre.shards, receipts, identity, verdicts)
    dataset.write_config(config_text(cfg))
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
        job = _job(cfg, pre, precision, identity)
        results, failed, run_seconds = run_tasks(
            cluster, plan.todo, job, cfg.cluster.retries, cfg.cluster.dashboard, plan.extend
        )
    summary = _finish(cfg, pre, dataset, plan, precision, results, failed, run_seconds)
    if cluster.lost and failed:
        summary["message"] = _lost_message(cluster.lost, len(failed), len(pre.shards))
    return summary


def _identity(cfg: TokenizeConfig, pre: Preflight, precision: str) -> dict:
    return job_identity(
        pre.tokenizer["fingerprint"], cfg.aug, tuple(cfg.seeds), precision, tuple(cfg.formats)
    )


def _lost_message(why: str, missing: int, shards: int) -> str:
    return (
        f"{why}: {missing} of {shards} shards were not tokenized. Finished shards are kept; "
        "rerun the same command (when the cluster can run workers again) to resume"
    )


def _lost(cfg: TokenizeConfig, pre: Preflight, why: str) -> dict:
    """The summary of a run that could get no worker before any shard ran."""
    return {
        "out_dir": pre.out_dir,
        "shards": len(pre.shards),
        "exit_code": 1,
        "message": _lost_message(why, len(pre.shards), len(pre.shards)),
        "next": [_command(cfg)],
    }


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
        **view_facts(cfg.aug, cfg.seeds, pre.images, cfg.shard_size, pre.shards),
        "tokenizer": pre.tokenizer,
        "tokenizer_source": pre.tokenizer_path,
        "teacher": pre.tokenizer.get("teacher"),
        "precision": precision,
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
    repair = not results and not plan.renumber and dataset.exists(MANIFEST_NAME)
    if results or plan.renumber or not dataset.manifest_is(receipts, info):
        if repair:
            log.warning("%s did not match the shard receipts; rewrote it from them", MANIFEST_NAME)
        # a worker killed mid-write (Dask reran its task elsewhere) leaves a temporary file
        dataset.remove_partial_files()
        dataset.write_bytes(VERSIONS_NAME, dumps(versions))
        dataset.write_manifest(receipts, info)
    summary["manifest"] = dataset.url_of(MANIFEST_NAME)
    summary["exit_code"] = 0
    if images == 0:
        summary["exit_code"] = 1
        summary["message"] = _nothing_tokenized(receipts, pre.images)
        summary["next"] = []
        return summary
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


def _nothing_tokenized(receipts: list[dict], images: str) -> str:
    """The message of a run in which every record was skipped: how many, why, examples."""
    skipped = [tuple(s) for r in receipts for s in r["skipped"]]
    reasons: dict[str, int] = {}
    for _, reason in skipped:
        reasons[reason] = reasons.get(reason, 0) + 1
    table = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items(), key=lambda x: -x[1]))
    examples = "; ".join(f"{key}: {reason}" for key, reason in skipped[:3])
    return (
        f"no image of images={images} could be tokenized: all {len(skipped)} records were "
        f"skipped ({table or 'no records'}; e.g. {examples or '-'}); check that images= points "
        "at the images (the dataset lists every skip in its receipts)"
    )


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
