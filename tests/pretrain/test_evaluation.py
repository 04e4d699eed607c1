"""The helpers the linear probe and fine-tuning share: top-k scores, the key-hash split, the view."""

from __future__ import annotations

import torch
from PIL import Image

from pretrain.evaluation import eval_views, key_in_val, topk_hits, topk_scores


def test_topk_hits_and_scores() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0], [0.0, 2.0, 1.0]])  # [3, 3]
    labels = torch.tensor([2, 1, 0])
    assert topk_hits(logits, labels) == (1, 3)  # 3 classes: every label is in the "top 5"
    assert topk_scores(1, 3, 3, num_classes=3) == {"top1": 100 / 3}  # no top-5 with <= 5 classes
    wide = torch.arange(8.0).repeat(4, 1)  # [4, 8]: class 7 first, then 6, 5, ...
    hits = topk_hits(wide, torch.tensor([7, 3, 2, 0]))
    assert hits == (1, 2)  # 7 is top-1; 3 is 5th; 2 and 0 are outside the top 5
    assert topk_scores(*hits, 4, num_classes=8) == {"top1": 25.0, "top5": 50.0}


def test_split_and_view_are_functions_of_the_key() -> None:
    assert [key_in_val(f"k{i}", 0.5) for i in range(50)] == [
        key_in_val(f"k{i}", 0.5) for i in range(50)
    ]
    assert not key_in_val("any", 0.0) and key_in_val("any", 1.0)
    image = Image.new("RGB", (50, 40), (10, 200, 30))
    view = eval_views(image, "some/key", 32)
    assert view.shape == (3, 32, 32) and view.dtype == torch.uint8
    assert torch.equal(view, eval_views(image, "other/key", 32))  # the centre crop: no key draw
