"""The report's views study: seeds_k.json of benchmarks/bench_seeds.py as a table, noise line, plot."""

import html
import importlib
import json
import os
import re
import statistics
import sys
from pathlib import Path

import pytest

from pipeline.cli import main as cli
from pipeline.report import views_study

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[2]
REAL = ROOT / "benchmarks" / "results" / "seeds_k.json"
CONFIGS = ("K=1", "K=2", "K=4", "K=8", "fresh")

# fresh's held-out MIM is 31.00 ± 1.00: K=1 (+0.50) and K=4 (-1.00) are inside that spread,
# K=2 (-3.50) and K=8 (+2.00, its own stdev 0.10) are outside it.
MIM = {
    "K=1": [31.0, 31.5, 32.0],
    "K=2": [27.0, 27.5, 28.0],
    "K=4": [29.0, 30.0, 31.0],
    "K=8": [32.9, 33.0, 33.1],
    "fresh": [30.0, 31.0, 32.0],
}
PROBE = {
    "K=1": [40.0, 44.44, 42.22],
    "K=2": [41.0, 41.0, 41.0],
    "K=4": [50.0, 52.0, 54.0],
    "K=8": [42.22, 37.78, 42.22],
    "fresh": [42.22, 40.0, 44.44],
}
SECONDS = {name: [30.0 + i, 31.0 + i, 35.0 + i] for i, name in enumerate(CONFIGS)}


def _study(command: str | None = None) -> dict:
    """A seeds_k.json of the exact shape bench_seeds.py writes (``command`` only when given)."""
    data = {
        "args": {
            "tokenizer": "/tmp/tok/tokenizer.pth",
            "sample": "/data/imagenet-sample",
            "images": "250",
            "epochs": "8",
            "seeds": "[0, 1, 2]",
            "ks": "[1, 2, 4, 8]",
            "probe_steps": "300",
            "work_dir": "/tmp/bench_seeds",
            "out": "/tmp/results/seeds_k.json",
        },
        "tokenize_seconds_8_seeds": 6.8,
        "results": {
            name: {
                "heldout_mim_acc": MIM[name],
                "probe_top1": PROBE[name],
                "pretrain_seconds": SECONDS[name],
            }
            for name in CONFIGS
        },
        "load_after": [2.08, 2.27, 1.85],
    }
    if command is not None:
        data = {"command": command, **data}
    return data


def _report(target: Path, out: Path) -> str:
    """The page ``pipeline report <target> out=<out>`` writes."""
    assert cli(["report", str(target), f"out={out}"]) == 0
    return (out / "index.html").read_text()


def _section(text: str, sid: str) -> str:
    start = text.index(f'<section id="{sid}">')
    return text[start : text.index("</section>", start)]


def _rows(section: str) -> dict[str, list[str]]:
    """Table rows of the section, by their first cell."""
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", section):
        cells = [html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", row)]
        if cells:
            rows[cells[0]] = cells[1:]
    return rows


def _cell(values: list[float], digits: int = 2) -> str:
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _noise_lines(section: str) -> list[str]:
    return [html.unescape(li) for li in re.findall(r"<li>(.*?)</li>", section)]


def test_the_study_table_has_each_configurations_means_and_spreads(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "seeds_k.json").write_text(json.dumps(_study(), indent=2))
    text = _report(folder, tmp_path / "out")
    assert "Not available" not in text
    section = _section(text, "views-study")
    rows = _rows(section)
    assert list(rows) == list(CONFIGS)
    for name in CONFIGS:
        runs, mim, probe, seconds = rows[name]
        assert runs == "3"
        assert mim == _cell(MIM[name])
        assert probe == _cell(PROBE[name])
        assert seconds.split(" ± ")[0] == f"{statistics.mean(SECONDS[name]):.1f}"
    assert rows["fresh"][1] == "31.00 ± 1.00" and rows["K=4"][2] == "52.00 ± 2.00"
    # no PNG beside the JSON: the plot is drawn from it, next to the page
    (img,) = re.findall(r'<img src="([^"]+)"', section)
    assert (tmp_path / "out" / img).is_file() and "Drawn from the JSON" in section
    # no command in the JSON: the equivalent one, rebuilt from its args, and said to be rebuilt
    assert "records no command" in section
    assert "benchmarks/bench_seeds.py --tokenizer /tmp/tok/tokenizer.pth" in section
    assert "--seeds 0 1 2 --ks 1 2 4 8 --probe-steps 300" in section
    overview = _section(text, "overview")
    assert "5 configurations x 3 run seeds, 250 images, 8 epochs" in overview


def test_the_noise_line_says_which_differences_are_inside_the_run_seed_spread(tmp_path):
    (tmp_path / "seeds_k.json").write_text(json.dumps(_study()))
    section = _section(_report(tmp_path, tmp_path / "out"), "views-study")
    mim, probe = _noise_lines(section)
    inside, outside = mim.split("; outside the run-seed spread: ")
    assert mim.startswith("held-out MIM top-1 % vs fresh (31.00 ± 1.00)")
    assert "K=1 (+0.50; larger stdev 1.00)" in inside
    assert "K=4 (-1.00; larger stdev 1.00)" in inside
    assert "K=2 (-3.50; larger stdev 1.00)" in outside
    assert "K=8 (+2.00; larger stdev 1.00)" in outside
    assert "K=2" not in inside and "K=1" not in outside
    # probe: K=4 is 9.78 points above fresh (outside); the others are within the spread
    assert probe.startswith("linear probe top-1 % vs fresh (42.22 ± 2.22): inside the run-seed")
    assert "spread: K=1 (+0.00; larger stdev 2.22), K=2 (-1.22; larger stdev 2.22), K=8" in probe
    assert probe.endswith("; outside the run-seed spread: K=4 (+9.78; larger stdev 2.22).")
    verdicts = {n: v for n, _, _, v in views_study.compare(_study()["results"], "heldout_mim_acc")}
    assert verdicts == {"K=1": "inside", "K=2": "outside", "K=4": "inside", "K=8": "outside"}


def test_single_run_seeds_and_a_missing_fresh_are_not_judged():
    one = {n: {m: v[:1] for m, v in r.items()} for n, r in _study()["results"].items()}
    assert {v for *_, v in views_study.compare(one, "probe_top1")} == {"no spread"}
    assert "not judged (one run seed" in views_study.noise_line(one, "probe_top1")
    no_fresh = {n: r for n, r in one.items() if n != "fresh"}
    assert views_study.compare(no_fresh, "probe_top1") == []
    assert "no fresh configuration" in views_study.noise_line(no_fresh, "probe_top1")


def test_a_json_file_given_directly_shows_its_command_and_png(tmp_path):
    study = tmp_path / "seeds_k_4ep.json"
    study.write_text(json.dumps(_study(".venv/bin/python benchmarks/bench_seeds.py --epochs 4")))
    views_study.plot(_study()["results"], study.with_suffix(".png"))
    text = _report(study, tmp_path / "out")
    section = _section(text, "views-study")
    assert "<h3>seeds_k_4ep.json" in section
    assert "Made by:" in section and "bench_seeds.py --epochs 4</code>" in section
    assert "records no command" not in section
    (img,) = re.findall(r'<img src="([^"]+)"', section)
    copied = tmp_path / "out" / img
    assert copied.read_bytes() == study.with_suffix(".png").read_bytes()
    assert "The plot saved beside the JSON" in section


def test_json_of_another_shape_is_not_a_study(tmp_path, capsys):
    other = _study()
    other["results"]["K=1"] = {"top1": [1.0, 2.0]}  # the keys, but not the script's metrics
    cases = {
        "wrong-metrics": other,
        "wrong-names": {**_study(), "results": {"offline": _study()["results"]["K=1"]}},
        "no-args": {"results": _study()["results"]},
        "a-list": [1, 2, 3],
    }
    for name, data in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "seeds_k.json").write_text(json.dumps(data))
        assert cli(["report", str(tmp_path / name)]) == 2, name
        assert "nothing to report" in capsys.readouterr().err
    # given as a file: refused with a reason
    assert cli(["report", str(tmp_path / "wrong-metrics" / "seeds_k.json")]) == 2
    assert "not a views study" in capsys.readouterr().err
    # beside a real run: the run is reported, the JSON is not shown as a study
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "step", "step": 0, "loss": 1.0}))
    (run / "seeds_k.json").write_text(json.dumps(other))
    text = _report(run, tmp_path / "out")
    assert 'id="views-study"' not in text and "(views)" not in text


def test_bench_seeds_draws_with_the_reports_plot_and_records_its_command(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench = importlib.import_module("bench_seeds")
    assert bench.plot is views_study.plot and bench.mean_spread is views_study.mean_spread
    command = bench.own_command(["--tokenizer", "t.pth", "--seeds", "0", "1"])
    assert command.endswith("benchmarks/bench_seeds.py --tokenizer t.pth --seeds 0 1")
    assert os.path.basename(sys.executable) in command


@pytest.mark.skipif(not REAL.is_file(), reason="benchmarks/results/seeds_k.json not written")
def test_the_real_seeds_k_json_renders(tmp_path):
    data = json.loads(REAL.read_text())
    text = _report(REAL, tmp_path / "out")
    assert "Not available" not in text
    section = _section(text, "views-study")
    rows = _rows(section)
    assert set(rows) == set(data["results"])
    for name, res in data["results"].items():
        assert rows[name][1] == _cell(res["heldout_mim_acc"])
        assert rows[name][2] == _cell(res["probe_top1"])
    assert len(_noise_lines(section)) == 2
    (img,) = re.findall(r'<img src="([^"]+)"', section)
    assert (tmp_path / "out" / img).is_file()
    assert "bench_seeds.py" in section and "--tokenizer" in section
