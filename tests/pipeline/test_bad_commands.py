"""Bad commands, for every stage and tool: exit 2, a message naming the key or file, no traceback.

Each row is a command a user could type by mistake: an empty value, a missing file, a wrong type,
a pattern that matches nothing, a file where a folder is expected or the reverse, a damaged
checkpoint or config. Every one must be refused before any work (the inputs are tiny files in a
temporary folder, and nothing trains or starts a cluster), with exit code 2 (README "Commands")
and a message that names what to fix. ``<name>`` in a row is a path made by the ``inputs``
fixture; the expected words are checked in stderr, with those paths filled in too.
"""

from __future__ import annotations

import logging
import re
import subprocess

import pytest
from support.cli_runs import ROOT, environment, pipeline_command
from support.pretrain_data import make_images, make_tokens
from support.pretrain_data import make_tokenizer as make_stage3_tokenizer
from support.stage2 import make_corpus, make_tokenizer
from support.token_datasets import make_dataset

from pipeline.cli import main


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """Tiny inputs, one of each kind a bad command points at."""
    root = tmp_path_factory.mktemp("bad")
    (root / "notes.txt").write_text("not images\n")
    (root / "empty").mkdir()
    (root / "folder").mkdir()
    (root / "folder" / "readme.md").write_text("a folder, not a file\n")
    (root / "garbage.pth").write_bytes(b"\x00\x01 this is not a checkpoint")
    (root / "garbage.safetensors").write_bytes(b"not safetensors either")
    (root / "broken.yaml").write_text("train: [epochs: 3\n")
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (root / "bad_manifest").mkdir()
    (root / "bad_manifest" / "manifest.json").write_text("{not json")
    make_corpus(root / "corpus", shards=1, per_shard=4)
    make_images(root / "unlabelled", count=3, bad=())  # a flat folder: no labels
    # a token dataset stage 3 can read: its images beside it, a checkpoint.pth that is garbage
    stage3 = make_stage3_tokenizer(root / "stage3_tokenizer.pth")
    make_tokens(make_images(root / "stage3_images"), stage3, root / "stage3_tokens")
    (root / "resume").mkdir()
    (root / "resume" / "checkpoint.pth").write_bytes(b"not a checkpoint")
    tokenizer = make_tokenizer(root / "tokenizer.pth")
    make_dataset(root / "tokens", num_shards=2, per_shard=3)
    return {
        "root": str(root),
        "txt": str(root / "notes.txt"),
        "empty": str(root / "empty"),
        "folder": str(root / "folder"),
        "garbage": str(root / "garbage.pth"),
        "garbage_st": str(root / "garbage.safetensors"),
        "broken_yaml": str(root / "broken.yaml"),
        "list_yaml": str(root / "list.yaml"),
        "binary_yaml": str(root / "binary.yaml"),
        "bad_manifest": str(root / "bad_manifest"),
        "missing": str(root / "missing"),
        "shards": str(root / "corpus" / "img-000000.tar"),
        "unlabelled": str(root / "unlabelled"),
        "brace": str(root / "corpus" / "img-{000000..000002}.tar"),
        "glob": str(root / "corpus" / "nothing-*.tar"),
        "tokenizer": tokenizer,
        "tokens": str(root / "tokens"),
        "stage3_tokens": str(root / "stage3_tokens"),
        "resume": str(root / "resume"),
        "out": str(root / "out"),
    }


# (id, arguments of `pipeline`, words the message must hold). An out_dir under <out> keeps a row
# that wrongly started work inside the temporary folder.
ROWS = [
    # --- stage=pack
    ("pack-images-empty", "run stage=pack images= out_dir=<out>/p1", ["images="]),
    ("pack-images-missing", "run stage=pack images=<missing> out_dir=<out>/p2", ["<missing>"]),
    ("pack-images-a-file", "run stage=pack images=<txt> out_dir=<out>/p3", ["<txt>"]),
    ("pack-images-empty-folder", "run stage=pack images=<empty> out_dir=<out>/p4", ["<empty>"]),
    ("pack-glob-matches-nothing", "run stage=pack images=<glob> out_dir=<out>/p5", ["nothing-*"]),
    ("pack-brace-partly-missing", "run stage=pack images=<brace> out_dir=<out>/p6", ["000001"]),
    ("pack-comma-list-part-missing", "run stage=pack images=<shards>,<missing> out_dir=<out>/p7",
     ["<missing>"]),
    ("pack-shard-size-negative", "run stage=pack images=<shards> shard_size=-1", ["shard_size"]),
    ("pack-shard-size-a-word", "run stage=pack images=<shards> shard_size=ten", ["shard_size"]),
    ("pack-out-dir-empty", "run stage=pack images=<shards> out_dir=", ["out_dir"]),
    ("pack-out-dir-a-file", "run stage=pack images=<shards> out_dir=<txt>", ["<txt>"]),
    ("pack-print-job-script", "run stage=pack images=<shards> --print-job-script",
     ["--print-job-script"]),
    # --- stage=vqkd
    ("vqkd-images-empty", "run stage=vqkd preset=demo images= out_dir=<out>/v1", ["images"]),
    ("vqkd-images-missing", "run stage=vqkd images=<missing> out_dir=<out>/v2", ["<missing>"]),
    ("vqkd-epochs-a-word", "run stage=vqkd images=<shards> train.epochs=ten", ["train.epochs"]),
    ("vqkd-batch-negative", "run stage=vqkd preset=demo images=<shards> train.batch_size=-1 "
     "out_dir=<out>/v3", ["batch_size"]),
    ("vqkd-unknown-teacher", "run stage=vqkd preset=demo images=<shards> teacher.name=nope:x "
     "out_dir=<out>/v4", ["nope:x"]),
    ("vqkd-teacher-weights-a-folder", "run stage=vqkd preset=demo images=<shards> "
     "teacher.weights=<folder> out_dir=<out>/v5", ["<folder>"]),
    ("vqkd-eval-images-missing", "run stage=vqkd preset=demo images=<shards> eval.images=<missing> "
     "out_dir=<out>/v6", ["<missing>"]),
    ("vqkd-crop-scale-reversed", "run stage=vqkd preset=demo images=<shards> "
     "train.crop_scale=[1.0,0.2] out_dir=<out>/v8", ["train.crop_scale"]),
    ("vqkd-warmup-negative", "run stage=vqkd preset=demo images=<shards> "
     "train.warmup_epochs=-0.5 out_dir=<out>/v10", ["train.warmup_epochs"]),
    ("vqkd-teacher-input-size-negative", "run stage=vqkd preset=demo images=<shards> "
     "teacher.input_size=-5 out_dir=<out>/v9", ["teacher.input_size"]),
    ("vqkd-patch-not-tiling", "run stage=vqkd preset=demo images=<shards> model.patch_size=7 "
     "out_dir=<out>/v7", ["patch_size"]),
    ("vqkd-config-a-folder", "run stage=vqkd config=<folder>", ["<folder>"]),
    ("vqkd-config-broken-yaml", "run stage=vqkd config=<broken_yaml>", ["<broken_yaml>"]),
    ("vqkd-config-not-a-mapping", "run stage=vqkd config=<list_yaml>", ["<list_yaml>"]),
    ("vqkd-config-missing", "run stage=vqkd config=<missing>", ["<missing>"]),
    # --- stage=tokenize
    ("tokenize-tokenizer-empty", "run stage=tokenize images=<shards> tokenizer= "
     "out_dir=<out>/t1", ["tokenizer"]),
    ("tokenize-tokenizer-a-folder", "run stage=tokenize images=<shards> tokenizer=<folder> "
     "out_dir=<out>/t2 aug.size=32", ["<folder>"]),
    ("tokenize-tokenizer-garbage", "run stage=tokenize images=<shards> tokenizer=<garbage> "
     "out_dir=<out>/t3 aug.size=32", ["<garbage>"]),
    ("tokenize-tokenizer-missing", "run stage=tokenize images=<shards> tokenizer=<missing> "
     "out_dir=<out>/t4 aug.size=32", ["<missing>"]),
    ("tokenize-images-a-file", "run stage=tokenize images=<txt> tokenizer=<tokenizer> "
     "out_dir=<out>/t5 aug.size=32", ["<txt>"]),
    ("tokenize-seeds-not-ints", "run stage=tokenize images=<shards> tokenizer=<tokenizer> "
     "seeds=[a] aug.size=32", ["seeds"]),
    ("tokenize-out-dir-empty", "run stage=tokenize images=<shards> tokenizer=<tokenizer> out_dir= "
     "aug.size=32", ["out_dir"]),
    ("tokenize-batch-negative", "run stage=tokenize images=<shards> tokenizer=<tokenizer> "
     "batch_size=-1 out_dir=<out>/t6 aug.size=32", ["batch_size"]),
    ("tokenize-unknown-format", "run stage=tokenize images=<shards> tokenizer=<tokenizer> "
     "formats=[csv] out_dir=<out>/t7 aug.size=32", ["formats"]),
    ("tokenize-unknown-precision", "run stage=tokenize images=<shards> tokenizer=<tokenizer> "
     "precision=fp64 out_dir=<out>/t8 aug.size=32", ["precision"]),
    ("tokenize-token-set-not-a-dataset", "run stage=tokenize images=<shards> tokenizer=<tokenizer> "
     "token_set=other out_dir=<empty> aug.size=32", ["token_set"]),
    ("tokenize-runner-outside-srun", "run stage=tokenize images=<shards> tokenizer=<tokenizer> "
     "cluster.kind=slurm-runner out_dir=<out>/t9 aug.size=32", ["slurm-runner"]),
    ("tokenize-address-with-slurm", "run stage=tokenize images=<shards> tokenizer=<tokenizer> "
     "cluster.kind=slurm cluster.address=tcp://127.0.0.1:1 out_dir=<out>/t10 aug.size=32",
     ["cluster.address"]),
    # numbers out of their range, and values that only the cluster would have found
    ("tokenize-seed-beyond-int32", "run stage=tokenize images=<shards> tokenizer=<tokenizer> "
     "seeds=[2147483648] out_dir=<out>/t11 aug.size=32", ["seeds[0]=2147483648", "2147483647"]),
    ("tokenize-seed-huge", "run stage=tokenize images=<shards> tokenizer=<tokenizer> "
     "seeds=[100000000000000000000000] out_dir=<out>/t12 aug.size=32", ["seeds[0]"]),
    ("tokenize-seed-negative", "run stage=tokenize images=<shards> tokenizer=<tokenizer> "
     "seeds=[0,-1] out_dir=<out>/t13 aug.size=32", ["seeds[1]=-1"]),
    ("tokenize-memory-limit-a-word", "run stage=tokenize images=<shards> tokenizer=<tokenizer> "
     "cluster.memory_limit=lots out_dir=<out>/t14 aug.size=32", ["cluster.memory_limit"]),
    ("tokenize-no-workers", "run stage=tokenize images=<shards> tokenizer=<tokenizer> "
     "cluster.n_workers=0 out_dir=<out>/t15 aug.size=32", ["cluster.n_workers=0"]),
    ("tokenize-config-binary", "run stage=tokenize config=<binary_yaml>", ["<binary_yaml>"]),
    # --- stage=pretrain
    ("pretrain-blr-negative", "run stage=pretrain preset=demo tokens=<stage3_tokens> "
     "train.blr=-1 out_dir=<out>/r14", ["train.blr=-1"]),
    ("pretrain-num-workers-negative", "run stage=pretrain preset=demo tokens=<stage3_tokens> "
     "train.num_workers=-1 out_dir=<out>/r15", ["train.num_workers=-1"]),
    ("pretrain-heads-not-dividing", "run stage=pretrain preset=demo tokens=<stage3_tokens> "
     "model.width=64 model.heads=3 out_dir=<out>/r16", ["heads=3"]),
    ("pretrain-epochs-zero", "run stage=pretrain preset=demo tokens=<stage3_tokens> "
     "train.epochs=0 out_dir=<out>/r17", ["train.epochs=0", ">= 1"]),
    ("pretrain-blr-nan", "run stage=pretrain preset=demo tokens=<stage3_tokens> "
     "train.blr=nan out_dir=<out>/r19", ["train.blr", "finite"]),
    ("vqkd-betas-one-value", "run stage=vqkd preset=demo images=<shards> train.betas=[0.9] "
     "out_dir=<out>/v11", ["train.betas needs 2 values"]),
    ("pretrain-seed-negative", "run stage=pretrain preset=demo tokens=<stage3_tokens> "
     "train.seed=-3 out_dir=<out>/r18", ["train.seed=-3"]),
    ("pretrain-tokens-empty", "run stage=pretrain preset=demo tokens= out_dir=<out>/r1",
     ["tokens"]),
    ("pretrain-tokens-missing", "run stage=pretrain preset=demo tokens=<missing> "
     "out_dir=<out>/r2", ["<missing>"]),
    ("pretrain-tokens-not-a-dataset", "run stage=pretrain preset=demo tokens=<empty> "
     "out_dir=<out>/r3", ["<empty>"]),
    ("pretrain-tokens-a-file", "run stage=pretrain preset=demo tokens=<txt> out_dir=<out>/r4",
     ["<txt>"]),
    ("pretrain-token-set-unknown", "run stage=pretrain preset=demo tokens=<tokens> token_set=nope "
     "out_dir=<out>/r5", ["nope"]),
    ("pretrain-images-missing", "run stage=pretrain preset=demo tokens=<tokens> images=<missing> "
     "out_dir=<out>/r6", ["<missing>"]),
    ("pretrain-manifest-garbage", "run stage=pretrain preset=demo tokens=<bad_manifest> "
     "out_dir=<out>/r8", ["<bad_manifest>/manifest.json"]),
    ("pretrain-patch-not-tiling", "run stage=pretrain preset=demo tokens=<tokens> "
     "model.image_size=30 model.patch_size=8 out_dir=<out>/r9", ["image_size"]),
    ("pretrain-num-masked-too-many", "run stage=pretrain preset=demo tokens=<stage3_tokens> "
     "mask.num_masked=1000 train.batch_size=4 train.num_workers=0 out_dir=<out>/r10",
     ["mask.num_masked"]),
    ("pretrain-views-seeds-not-stored", "run stage=pretrain preset=demo tokens=<stage3_tokens> "
     "views.seeds=[7] train.batch_size=4 out_dir=<out>/r11", ["views.seeds"]),
    ("pretrain-resume-garbage-checkpoint", "run stage=pretrain preset=demo "
     "tokens=<stage3_tokens> train.resume=true train.batch_size=4 train.num_workers=0 "
     "out_dir=<resume>", ["<resume>/checkpoint.pth"]),
    ("pretrain-online-another-tokenizer", "run stage=pretrain preset=demo "
     "tokens=<stage3_tokens> targets=online tokenizer=<tokenizer> train.batch_size=4 "
     "out_dir=<out>/r12", ["tokenizer"]),
    ("pretrain-epochs-a-word", "run stage=pretrain preset=demo train.epochs=ten", ["train.epochs"]),
    ("pretrain-warmup-negative", "run stage=pretrain preset=demo tokens=<stage3_tokens> "
     "train.warmup_epochs=-1 train.batch_size=4 out_dir=<out>/r13", ["train.warmup_epochs"]),
    ("pretrain-online-tokenizer-a-folder", "run stage=pretrain preset=demo tokens=<tokens> "
     "targets=online tokenizer=<folder> out_dir=<out>/r7", ["<folder>"]),
    # --- stage=linprobe / finetune
    ("linprobe-backbone-empty", "run stage=linprobe preset=demo backbone= images=<shards> "
     "out_dir=<out>/l1", ["backbone"]),
    ("linprobe-backbone-a-folder", "run stage=linprobe preset=demo backbone=<folder> "
     "images=<shards> out_dir=<out>/l2", ["<folder>"]),
    ("linprobe-backbone-garbage", "run stage=linprobe preset=demo backbone=<garbage> "
     "images=<shards> out_dir=<out>/l3", ["<garbage>"]),
    ("linprobe-backbone-garbage-safetensors", "run stage=linprobe preset=demo "
     "backbone=<garbage_st> images=<shards> out_dir=<out>/l4", ["<garbage_st>"]),
    ("linprobe-images-empty", "run stage=linprobe preset=demo images= out_dir=<out>/l5",
     ["images"]),
    ("linprobe-images-a-file", "run stage=linprobe preset=demo images=<txt> out_dir=<out>/l6",
     ["<txt>"]),
    ("linprobe-random-init-not-tiling", "run stage=linprobe preset=demo images=<shards> "
     "random_init.patch_size=7 out_dir=<out>/l8", ["patch_size"]),
    ("linprobe-unlabelled-images", "run stage=linprobe preset=demo images=<unlabelled> "
     "out_dir=<out>/l9", ["no labelled images", "<unlabelled>"]),
    ("linprobe-unknown-teacher", "run stage=linprobe preset=demo backbone=teacher:nope "
     "images=<shards> out_dir=<out>/l7", ["nope"]),
    ("finetune-backbone-missing", "run stage=finetune preset=demo backbone=<missing> "
     "images=<shards> out_dir=<out>/f1", ["<missing>"]),
    ("finetune-glob-matches-nothing", "run stage=finetune preset=demo images=<glob> "
     "out_dir=<out>/f2", ["nothing-*"]),
    ("finetune-val-images-missing", "run stage=finetune preset=demo images=<shards> "
     "images_val=<missing> out_dir=<out>/f3", ["<missing>"]),
    ("finetune-unlabelled-images", "run stage=finetune preset=demo images=<unlabelled> "
     "out_dir=<out>/f4", ["no labelled images", "<unlabelled>"]),
    ("finetune-crop-scale-reversed", "run stage=finetune preset=demo images=<shards> "
     "crop_scale=[1.0,0.2] out_dir=<out>/f5", ["crop_scale"]),
    ("finetune-warmup-negative", "run stage=finetune preset=demo images=<shards> "
     "train.warmup_epochs=-1 out_dir=<out>/f6", ["train.warmup_epochs"]),
    ("finetune-epochs-a-word", "run stage=finetune train.epochs=ten", ["train.epochs"]),
    # --- an out_dir / out= that cannot be written to: a file, a path under a file, a folder
    # where a file goes (an immutable folder needs chattr: tests/pipeline/test_out_dir_writable.py)
    ("pack-out-dir-under-a-file", "run stage=pack images=<shards> out_dir=<txt>/shards",
     ["out_dir=<txt>/shards cannot be made: <txt> is a file"]),
    ("vqkd-out-dir-a-file", "run stage=vqkd preset=demo images=<shards> out_dir=<txt>",
     ["out_dir=<txt> is a file"]),
    ("tokenize-out-dir-a-file", "run stage=tokenize images=<shards> tokenizer=<tokenizer> "
     "out_dir=<txt> aug.size=32", ["out_dir=<txt> is a file"]),
    ("tokenize-out-dir-under-a-file", "run stage=tokenize images=<shards> tokenizer=<tokenizer> "
     "out_dir=<txt>/tokens aug.size=32", ["out_dir=<txt>/tokens cannot be made: <txt> is a file"]),
    ("pretrain-out-dir-a-file", "run stage=pretrain preset=demo tokens=<stage3_tokens> "
     "out_dir=<txt>", ["out_dir=<txt> is a file"]),
    ("linprobe-out-dir-a-file", "run stage=linprobe preset=demo images=<shards> out_dir=<txt>",
     ["out_dir=<txt> is a file"]),
    ("export-out-a-folder", "export <garbage> out=<folder>", ["out=<folder> is a folder"]),
    ("inspect-out-a-file", "inspect <tokens> out=<txt>", ["out=<txt> is a file"]),
    ("all-out-dir-a-file", "run stage=all stages=[pack] images=<shards> out_dir=<txt>",
     ["out_dir=<txt> is a file"]),
    ("report-out-a-file", "report <empty> out=<txt>", ["out=<txt> is a file"]),
    # --- stage=all
    ("all-unknown-stage", "run stage=all stages=[pack,nope] out_dir=<out>/a1", ["nope"]),
    ("all-images-missing", "run stage=all images=<missing> out_dir=<out>/a2", ["<missing>"]),
    ("all-images-empty", "run stage=all images= stages=[pack] out_dir=<out>/a3", ["images"]),
    ("all-no-corpus-images", "run stage=all corpus_images=0 out_dir=<out>/a6", ["corpus_images"]),
    ("all-stage-override-bad-type", "run stage=all images=<shards> vqkd=[train.epochs=ten] "
     "out_dir=<out>/a4", ["train.epochs"]),
    ("all-stage-override-unknown-key", "run stage=all images=<shards> pretrain=[trian.epochs=1] "
     "out_dir=<out>/a5", ["trian"]),
    # --- tools
    ("validate-a-file", "validate <txt>", ["<txt>"]),
    ("validate-not-a-dataset", "validate <empty>", ["<empty>"]),
    ("validate-missing", "validate <missing>", ["<missing>"]),
    ("validate-images-missing", "validate <tokens> images=<missing>", ["<missing>"]),
    ("validate-unknown-option", "validate <tokens> colour=red", ["colour"]),
    ("validate-shard-size-a-word", "validate <tokens> shard_size=ten", ["shard_size"]),
    ("validate-checksum-maybe", "validate <tokens> checksum=maybe", ["checksum"]),
    ("inspect-not-a-dataset", "inspect <empty>", ["<empty>"]),
    ("inspect-a-file", "inspect <txt>", ["<txt>"]),
    ("inspect-keys-a-word", "inspect <tokens> images=<shards> keys=many out=<out>/i1", ["keys"]),
    ("export-garbage", "export <garbage> out=<out>/e1.safetensors", ["<garbage>"]),
    ("export-a-folder", "export <folder> out=<out>/e2.safetensors", ["<folder>"]),
    ("export-a-tokenizer", "export <tokenizer> out=<out>/e3.safetensors", ["<tokenizer>"]),
    ("export-unknown-option", "export <garbage> colour=red", ["colour"]),
    ("plan-tokenizer-a-folder", "plan num_images=10 tokenizer=<folder> aug.size=32", ["<folder>"]),
    ("plan-num-images-a-word", "plan num_images=ten tokenizer=<tokenizer>", ["num_images"]),
    ("plan-images-missing", "plan images=<missing> tokenizer=<tokenizer> aug.size=32",
     ["<missing>"]),
    ("plan-nothing-to-plan", "plan tokenizer=<tokenizer> aug.size=32", ["images="]),
    ("report-empty-folder", "report <empty> out=<out>/rep1", ["<empty>"]),
    ("report-missing", "report <missing>", ["<missing>"]),
    ("report-unknown-option", "report <empty> colour=red", ["colour"]),
    ("stages-extra-argument", "stages nope", ["nope"]),
    ("unknown-command", "tokenise", ["tokenise"]),
    ("unknown-log-level", "log_level=loud stages", ["log_level"]),
]  # fmt: skip

# Rows also run as a real process: the console script's stderr, not capsys.
SUBPROCESS_ROWS = ("pack-images-empty", "validate-a-file", "tokenize-tokenizer-a-folder")


def _fill(text: str, paths: dict[str, str]) -> str:
    return re.sub(r"<(\w+)>", lambda m: paths.get(m.group(1), m.group(0)), text)


def _argv(command: str, paths: dict[str, str]) -> list[str]:
    return [_fill(arg, paths) for arg in command.split()]


def _check(code: int, out: str, err: str, words: list[str], paths: dict[str, str]) -> None:
    assert code == 2, f"exit {code}\nstdout:\n{out[-2000:]}\nstderr:\n{err[-3000:]}"
    assert "Traceback" not in err and "Traceback" not in out, err[-3000:]
    for word in words:
        assert _fill(word, paths) in err, f"{_fill(word, paths)!r} not in stderr:\n{err[-3000:]}"


def test_the_table_covers_every_stage_and_tool():
    from pipeline.stages import STAGES
    from pipeline.tools import TOOLS

    commands = [row[1].split() for row in ROWS]
    stages = {a.removeprefix("stage=") for c in commands for a in c if a.startswith("stage=")}
    tools = {c[0] for c in commands}
    assert stages == set(STAGES) and set(TOOLS) | {"stages"} <= tools
    assert len(ROWS) >= 30 and len({row[0] for row in ROWS}) == len(ROWS)


@pytest.mark.parametrize(("command", "words"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_command_is_exit_2_naming_what_to_fix(
    command, words, inputs, capsys, caplog, monkeypatch, tmp_path
):
    monkeypatch.chdir(tmp_path)  # a row that wrongly writes into "." writes here
    caplog.set_level(logging.INFO)
    code = main(_argv(command, inputs))
    out, err = capsys.readouterr()
    _check(code, out, err, words, inputs)
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)


@pytest.mark.parametrize("row", [r for r in ROWS if r[0] in SUBPROCESS_ROWS], ids=lambda r: r[0])
def test_bad_command_from_the_console_script(row, inputs):
    _, command, words = row
    done = subprocess.run(
        pipeline_command() + _argv(command, inputs),
        cwd=ROOT,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    _check(done.returncode, done.stdout, done.stderr, words, inputs)
