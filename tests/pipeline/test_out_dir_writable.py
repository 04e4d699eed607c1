"""An out_dir / out= that cannot be written (an immutable folder, or a new folder inside one) is
refused by every stage and tool with exit 2 and a message naming it, before any work: nothing is
written, no cluster starts, no traceback. (A file where a folder goes, and the reverse, are rows
of test_bad_commands.py.)"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import pretrain_data, stage2
from support.immutable import immutable_folder

from pipeline.cli import main


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    root = tmp_path_factory.mktemp("writable")
    images = pretrain_data.make_images(root / "images")
    stage3 = pretrain_data.make_tokenizer(root / "stage3_tokenizer.pth")
    with immutable_folder(root / "immutable") as locked:
        yield {
            "shards": stage2.make_corpus(root / "corpus", shards=1, per_shard=4),
            "tokenizer": stage2.make_tokenizer(root / "tokenizer.pth"),
            "images": str(images),
            "tokens": str(pretrain_data.make_tokens(images, stage3, root / "tokens")),
            "immutable": str(locked),
        }


ROWS = [
    ("pack", "run stage=pack images=<shards> out_dir=<out>"),
    ("vqkd", "run stage=vqkd preset=demo images=<shards> out_dir=<out>"),
    ("tokenize", "run stage=tokenize images=<shards> tokenizer=<tokenizer> aug.size=32 "
     "out_dir=<out>"),
    ("pretrain", "run stage=pretrain preset=demo images=<images> tokens=<tokens> out_dir=<out>"),
    ("linprobe", "run stage=linprobe preset=demo images=<shards> out_dir=<out>"),
    ("all", "run stage=all stages=[pack] images=<shards> out_dir=<out>"),
    ("export", "export <tokens> out=<out>/backbone.safetensors"),
    ("inspect", "inspect <tokens> out=<out>"),
]  # fmt: skip


@pytest.mark.parametrize("below", ["", "new"], ids=["the-folder", "a-folder-inside"])
@pytest.mark.parametrize("command", [r[1] for r in ROWS], ids=[r[0] for r in ROWS])
def test_an_unwritable_out_dir_is_exit_2_before_any_work(
    command: str, below: str, inputs: dict[str, str], capsys: pytest.CaptureFixture
) -> None:
    locked = Path(inputs["immutable"])
    out = str(locked / below) if below else str(locked)
    paths = {**inputs, "out": out}
    argv = [re.sub(r"<(\w+)>", lambda m: paths[m.group(1)], arg) for arg in command.split()]
    code = main(argv)
    _, err = capsys.readouterr()
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    given = next(a for a in argv if a.startswith(("out=", "out_dir=")))
    assert f"{given} is not writable ({locked}: Operation not permitted)" in err, err
    assert list(locked.iterdir()) == []
