import random

import pytest

from core_helpers import make_req
from inlaid.core.block_manager import BlockManager


def test_allocate_grows_table_by_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    req = make_req("a", prompt_len=5)
    table = bm.allocate_for(req, 5)
    assert len(table) == 2 and bm.num_free_blocks == 6
    req.num_computed_tokens = 5
    assert bm.num_new_blocks(req, 3) == 0  # 8 tokens fit in 2 blocks
    assert bm.num_new_blocks(req, 4) == 1
    bm.allocate_for(req, 4)
    assert len(bm.block_table("a")) == 3
    assert bm.free(req) == 3 and bm.num_free_blocks == 8 and bm.block_table("a") == []


def test_out_of_blocks_raises_and_can_allocate_says_so():
    bm = BlockManager(num_blocks=2, block_size=4)
    req = make_req("a", prompt_len=9)
    assert not bm.can_allocate(req, 9)
    with pytest.raises(RuntimeError, match="out of blocks"):
        bm.allocate_for(req, 9)
    assert bm.num_free_blocks == 2


def test_never_hands_out_a_block_twice_under_random_churn():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=32, block_size=4)
    live = {}
    for step in range(2000):
        if live and rng.random() < 0.4:
            rid = rng.choice(list(live))
            bm.free(live.pop(rid))
        else:
            req = make_req(f"r{step}", prompt_len=rng.randint(1, 20))
            n = rng.randint(1, 20)
            if bm.can_allocate(req, n):
                bm.allocate_for(req, n)
                live[req.request_id] = req
        tables = [b for r in live.values() for b in bm.block_table(r.request_id)]
        assert len(tables) == len(set(tables))
        assert len(tables) + bm.num_free_blocks == 32
        assert 0.0 <= bm.usage() <= 1.0


def test_bad_geometry_rejected():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 4)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)
