"""``pipeline report DIR [DIR ...]``: one self-contained HTML page about runs of any stage.

The page (``<DIR>/report/index.html``, figures beside it, referenced relatively) shows what the
folders hold, each recognised by its own files (``discover.py``): what each run is, the training
curves and final-epoch numbers of every ``metrics.jsonl`` (``curves.py``), a token dataset's
codebook usage and views beside their token maps (``tokens.py``), a pretrained model's masked
predictions (``mim.py``), probe results, ``stage=all`` timings and where the files are
(``tables.py``), and the K-stored-views-vs-fresh study of ``benchmarks/bench_seeds.py``
(``views_study.py``, also the home of that study's plot). The sections build on ``base.py``
(``Report``, ``per_part``), ``page.py`` assembles them into the page and ``command.py`` is the
command line.
"""
