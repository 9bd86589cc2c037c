import pytest
import torch

from lawa_diffusion.maths.averaging import average_tensor_lists, flat_views, mean_of_rows
from tests.helpers import unflatten_with_flat_empties


def test_mean_of_rows_matches_float64_for_bf16_storage():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(7, 1000, generator=g).to(torch.bfloat16)
    ref = rows.double().mean(0)
    out = mean_of_rows(rows)
    assert out.dtype == torch.float32
    assert (out.double() - ref).abs().max().item() < 1e-6


def test_average_tensor_lists_streams_and_writes_into_out():
    g = torch.Generator().manual_seed(1)
    lists = [[torch.randn(3, 4, generator=g), torch.randn(5, generator=g)] for _ in range(4)]
    ref = [sum(l[i].double() for l in lists) / 4 for i in range(2)]
    out = [torch.empty(3, 4), torch.empty(5)]
    average_tensor_lists(iter(lists), out)
    for o, r in zip(out, ref):
        assert (o.double() - r).abs().max().item() < 1e-6


def test_average_tensor_lists_errors():
    with pytest.raises(ValueError, match="empty"):
        average_tensor_lists([])
    with pytest.raises(ValueError, match="shapes"):
        average_tensor_lists([[torch.zeros(2)], [torch.zeros(3)]])


def test_flat_views_share_memory():
    flat = torch.arange(10.0)
    a, b = flat_views(flat, [torch.empty(2, 3), torch.empty(4)])
    a.fill_(-1)
    assert flat[:6].eq(-1).all() and b.tolist() == [6.0, 7.0, 8.0, 9.0]


@pytest.mark.parametrize("unflatten", ["installed", "flat_empties"])
def test_flat_views_keep_the_shape_of_empty_shards(monkeypatch, unflatten):
    if unflatten == "flat_empties":
        monkeypatch.setattr(torch._utils, "_unflatten_dense_tensors", unflatten_with_flat_empties)
    flat = torch.arange(6.0)
    like = [torch.empty(0, 8, 3, 3), torch.empty(2, 3), torch.empty(0)]  # a conv_out's empty local shard, a bias
    views = flat_views(flat, like)
    assert [v.shape for v in views] == [t.shape for t in like]
    views[1].fill_(-1)
    assert flat.eq(-1).all()
    only_empty = flat_views(torch.empty(0), [torch.empty(0, 8, 3, 3), torch.empty(0)])  # a whole shard empty
    assert [v.shape for v in only_empty] == [torch.Size([0, 8, 3, 3]), torch.Size([0])]
