"""The sub-commands beside ``pipeline run``: one :class:`Tool` entry each, and nothing else.

A tool names its function by import path (``"module:function"``, called with the arguments after
the sub-command, returning an exit code), so ``pipeline --help`` imports no torch. The CLI answers
``pipeline <tool> --help`` (and a bare ``pipeline <tool>`` when the tool needs an argument) from
the entry, the same way for every tool: adding a sub-command is adding one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipeline.stages import load_target


@dataclass(frozen=True)
class Tool:
    name: str
    target: str  # "module:function"; the function takes argv (after the name), returns exit code
    summary: str  # one line for `pipeline --help`
    usage: str  # the argument pattern after `pipeline <name>`
    # (argument, meaning) pairs shown by `pipeline <name> --help`
    arguments: tuple[tuple[str, str], ...] = ()
    # example arguments; {placeholders} are folders of the demo's run layout (absolute paths)
    example: str = ""
    # positional arguments that are local paths which must exist (0 = none, -1 = all)
    paths: int = 0
    # what the exit code 1 means for this tool ("" = the work failed)
    failure: str = ""
    # what out= must name, checked before the tool runs: "folder", "file", or "" (no out=)
    out: str = ""

    def function(self) -> Callable[[list[str]], int]:
        return load_target(self.target)


TOOLS: dict[str, Tool] = {
    t.name: t
    for t in [
        Tool(
            "validate",
            "shards.validate:main",
            "check a token dataset and its token sets: checksums, counts, ranges, alignment "
            "with the images, shared views",
            "<token dataset> [images=<image source>] [shard_size=<n>] [checksum=false]",
            (
                ("<token dataset>", "the folder stage 2 wrote (holds manifest.json)"),
                (
                    "images=",
                    "the image source it was made from: also checks keys and image bytes "
                    "(default: the source the manifest records, when it is reachable here; "
                    "none: check the token files only)",
                ),
                ("shard_size=", "images per shard of a folder image source (default: manifest)"),
                ("checksum=false", "skip the per-file sha256 checks (faster)"),
            ),
            "{tokenize} 'images={pack_shards}'",
            paths=1,
            failure="the data is damaged: missing, truncated, corrupt or edited files, or images "
            "that differ from the ones tokenized (each printed as a PROBLEM line)",
        ),
        Tool(
            "inspect",
            "shards.inspect:main",
            "summarise a token dataset and draw its token usage and token maps",
            "<token dataset> [out=<dir>] [images=<image source>] [shard_size=<n>] [keys=<n>]",
            (
                ("<token dataset>", "the folder stage 2 wrote (holds manifest.json)"),
                ("out=", "where the PNGs go (default: <token dataset>/inspect)"),
                ("images=", "the image source: also draws each key's views with their tokens"),
                ("shard_size=", "images per shard of a folder image source (default: manifest)"),
                ("keys=", "how many images to draw with images= (default 3)"),
            ),
            "{tokenize} 'images={pack_shards}'",
            paths=1,
            out="folder",
        ),
        Tool(
            "export",
            "pretrain.export:main",
            "export a pretrain checkpoint as a timm-loadable backbone",
            "<pretrain checkpoint> [out=<file .safetensors or .pth>]",
            (
                ("<pretrain checkpoint>", "checkpoint.pth written by stage=pretrain"),
                ("out=", "the backbone file (default: <checkpoint>.timm.safetensors)"),
            ),
            "{pretrain_checkpoint} out={pretrain}/backbone.safetensors",
            paths=1,
            out="file",
        ),
        Tool(
            "plan",
            "tokenize_corpus.plan:main",
            "what stage=tokenize would cost (views, FLOPs, time, disk, memory), before running",
            "images=<image source>|num_images=<n> tokenizer=<ckpt> [stage=tokenize keys] "
            "[epochs=<E>] [gpu=<kind>]",
            (
                ("images=", "the image source stage=tokenize would read (its images are counted)"),
                ("num_images=", "plan for this many images instead of images="),
                ("tokenizer=", "the VQ-KD checkpoint (its config gives the FLOPs)"),
                (
                    "seeds= ...",
                    "seeds, precision, batch_size, shard_size, aug.*, cluster.*: as in stage=tokenize",
                ),
                ("epochs=", "pretraining epochs for the online comparison (default 300)"),
                ("gpu=", "estimate for a GPU kind (t4 v100 a10g l4 a100 h100 h200): not measured"),
                ("calibration.batches=", "timed forward batches of the calibration (default 2)"),
            ),
            "'images={pack_shards}' tokenizer={tokenizer} aug.size=96 epochs=300",
        ),
        Tool(
            "report",
            "pipeline.report.command:main",
            "write an HTML report of one or several run directories of any stage",
            "<run dir> [<run dir> ...] [out=<dir>]",
            (
                ("<run dir>", "any stage's out_dir, or a stage=all folder holding several"),
                ("out=", "the report folder (default: <run dir>/report, or beside several)"),
            ),
            "{root}",
            paths=-1,
            out="folder",
        ),
    ]
}
