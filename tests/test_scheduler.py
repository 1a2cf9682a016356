"""The scheduler and its block pool without a model: admission, chunking, prefix reuse, eviction,
preemption. A pass is simulated: every request that gets a token from it gets token 7."""

from __future__ import annotations

import pytest

from modeltest.engine.kv_cache import BlockPool, MediaSpan, block_hashes, blocks_needed
from modeltest.engine.request import Request, RequestStatus, SamplingParams
from modeltest.engine.scheduler import Scheduler, SchedulerConfig

STOP = 99


def scheduler(num_blocks=8, batch=2, block=4, batched=64, prefix_cache=True):
    return Scheduler(
        SchedulerConfig(
            max_batch_size=batch,
            max_input_length=64,
            max_output_length=16,
            block_size=block,
            num_blocks=num_blocks,
            max_num_batched_tokens=batched,
            prefix_cache=prefix_cache,
        )
    )


def request(rid, prompt=6, new=4, ids=None):
    return Request(
        id=rid,
        input_ids=list(ids) if ids is not None else list(range(prompt)),
        params=SamplingParams(max_new_tokens=new, stop_token_ids=(STOP,)),
    )


def run_pass(s):
    sp = s.schedule()
    for r in sp.sampled:
        r.output_ids.append(7)
    s.completed(sp)
    s.retire()
    return sp


def test_admission_is_first_come_first_served_within_slots_and_prompt_blocks():
    s = scheduler(num_blocks=4, batch=3)  # a 6-token prompt takes 2 blocks of 4 at admission
    reqs = [request(i, ids=range(10 * i, 10 * i + 6)) for i in range(3)]  # no prefix in common
    for r in reqs:
        s.add(r)
    first = s.schedule()
    assert [c.request.id for c in first.chunks] == [0, 1] and not first.decodes  # blocks for two
    assert s.pool.num_free == 0 and reqs[2].status is RequestStatus.WAITING
    s.completed(first)
    reqs[0].output_ids = [STOP]
    assert [r.id for r in s.retire()] == [0] and s.pool.num_free == 2
    nxt = s.schedule()
    assert [r.id for r in nxt.decodes] == [1] and [c.request.id for c in nxt.chunks] == [2]


def test_a_request_that_can_never_fit_is_refused_on_arrival_with_why():
    s = scheduler(num_blocks=2)
    s.add(request("big", prompt=20, new=4))
    ended = s.retire()
    assert [r.id for r in ended] == ["big"] and ended[0].status is RequestStatus.FAILED
    assert "do not fit the KV cache (8 tokens)" in ended[0].error
    s.add(request("long", prompt=65))
    assert "over max_input_length 64" in s.retire()[0].error


def test_a_chunk_size_that_cannot_move_a_prefill_on_is_refused():
    with pytest.raises(ValueError, match="at least max_batch_size \\+ block_size"):
        scheduler(batch=4, block=16, batched=16)


def test_abort_frees_blocks_at_once_and_is_reported_once():
    s = scheduler(prefix_cache=False)
    a, b = request("a"), request("b")
    s.add(a)
    s.add(b)
    run_pass(s)
    free = s.pool.num_free
    assert s.abort("a") is a and s.pool.num_free == free + 2 and not a.blocks
    assert s.abort("a") is None and s.abort("nope") is None
    ended = s.retire()
    assert [r.id for r in ended] == ["a"] and a.status is RequestStatus.ABORTED
    assert s.retire() == [] and [r.id for r in s.running] == ["b"]


def test_a_long_prompt_is_prefilled_in_block_aligned_chunks_while_the_others_decode():
    s = scheduler(num_blocks=16, batch=2, block=4, batched=11)
    short = request("short", prompt=3, new=8)
    s.add(short)
    run_pass(s)
    s.add(request("long", prompt=30, new=2))
    pieces = []
    while s.running and len(pieces) < 10:
        sp = run_pass(s)
        assert [r.id for r in sp.decodes][:1] == ["short"] or short.status is not RequestStatus.RUNNING
        pieces += [(c.start, c.end) for c in sp.chunks]
        if not any(c.request.id == "long" for c in sp.chunks):
            break
    # 11 tokens a pass, one of them short's decode: 10 -> 8 (two whole blocks), then the rest
    assert pieces == [(0, 8), (8, 16), (16, 24), (24, 30)]


def test_block_hashes_follow_tokens_prefix_and_media_content():
    toks = list(range(12))
    img = [MediaSpan("image", 0, 5, 7, key="cat")]
    same = block_hashes(toks, img, 4, [])
    assert len(same) == 3 and same == block_hashes(toks, [MediaSpan("image", 0, 5, 7, key="cat")], 4, [])
    other = block_hashes(toks, [MediaSpan("image", 0, 5, 7, key="dog")], 4, [])
    # same placeholder ids, other pixels: the block holding them and every later one differ
    assert other[0] == same[0] and other[1] != same[1] and other[2] != same[2]
    assert block_hashes(toks[:1] + [100] + toks[2:], img, 4, [])[0] != same[0]
    assert block_hashes(toks, img, 4, same[:1]) == same  # extending a known prefix


def test_a_shared_prefix_is_reused_and_freed_only_with_its_last_reader():
    s = scheduler(num_blocks=8, batch=3)
    a = request("a", ids=list(range(10)))
    s.add(a)
    run_pass(s)
    b = request("b", ids=list(range(8)) + [50, 51, 52])
    s.add(b)
    sp = run_pass(s)
    assert b.num_computed == 11 and b.cached_tokens == 8 and [(c.start, c.end) for c in sp.chunks] == [(8, 11)]
    assert b.blocks[:2] == a.blocks[:2] and all(s.pool.refs[x] == 2 for x in a.blocks[:2])
    s.abort("a")
    s.retire()
    assert all(s.pool.refs[x] == 1 and x not in s.pool.free for x in b.blocks[:2])
    shared = b.blocks[:2]
    s.abort("b")
    s.retire()
    assert all(x in s.pool.free for x in shared) and s.pool.cached_blocks >= 2  # free, still findable
    c = request("c", ids=list(range(9)))
    s.add(c)
    run_pass(s)
    assert c.cached_tokens == 8 and c.blocks[:2] == shared
    assert s.counters.cached_tokens == 16 and s.counters.prompt_tokens == 10 + 11 + 9


def test_a_prompt_found_whole_recomputes_its_last_block_for_its_first_token():
    s = scheduler()
    s.add(request("a", ids=list(range(8))))
    run_pass(s)
    b = request("b", ids=list(range(8)))
    s.add(b)
    sp = run_pass(s)
    assert b.cached_tokens == 4 and [(c.start, c.end) for c in sp.chunks] == [(4, 8)] and b.output_ids == [7]


def test_requests_admitted_in_one_pass_share_the_blocks_it_computes():
    s = scheduler(batch=2)
    a, b = request("a", ids=list(range(10))), request("b", ids=list(range(10)))
    s.add(a)
    s.add(b)
    sp = s.schedule()
    assert [(c.request.id, c.start) for c in sp.chunks] == [("a", 0), ("b", 8)] and b.blocks[:2] == a.blocks[:2]


def test_a_failed_pass_leaves_no_block_it_was_to_compute_findable():
    s = scheduler()
    a = request("a", ids=list(range(10)))
    s.add(a)
    sp = s.schedule()
    assert s.pool.cached_blocks == 2
    s.fail(sp.requests, "boom", sp=sp)
    assert s.pool.cached_blocks == 0 and s.pool.num_free == 8


def test_eviction_takes_the_least_recently_freed_block_first():
    pool = BlockPool(3)
    blocks = pool.allocate(3)
    for i, b in enumerate(blocks):
        pool.register(b, bytes([i]))
    for b in blocks:  # freed in order: blocks[0] first
        pool.release([b])
    assert pool.lookup([bytes([0]), bytes([1])]) == blocks[:2]
    assert pool.allocate(1) == [blocks[0]] and pool.evictions == 1
    assert pool.lookup([bytes([0])]) == [] and pool.lookup([bytes([1]), bytes([2])]) == blocks[1:]
    pool.take([blocks[2]])  # held again: out of the free list, never evicted while held
    assert pool.allocate(1) == [blocks[1]] and pool.num_free == 0


def test_blocks_are_taken_as_tokens_come_and_the_newest_is_preempted_when_they_run_out():
    s = scheduler(num_blocks=4, batch=2, prefix_cache=True)
    a, b = request("a", prompt=4, new=8), request("b", prompt=4, new=8)
    a.input_ids, b.input_ids = list(range(4)), list(range(10, 14))
    s.add(a)
    s.add(b)
    run_pass(s)  # both prefilled: one block each, two free
    assert len(a.blocks) == len(b.blocks) == 1 and s.pool.num_free == 2
    run_pass(s)  # token 4 of each needs a second block
    assert s.pool.num_free == 0
    for _ in range(3):
        run_pass(s)
    # a's token 8 needs a third block: none free, so b (the newest) gives its blocks back
    sp = run_pass(s)
    assert b.status is RequestStatus.WAITING and b.preemptions == 1 and s.waiting[0] is b and not b.blocks
    assert [r.id for r in sp.decodes] == ["a"] and s.counters.preemptions == 1
    outputs_before = list(b.output_ids)
    while a.status is RequestStatus.RUNNING:
        run_pass(s)
    run_pass(s)  # b back: it prefills prompt + its tokens, its first block found in the cache
    assert b.status is RequestStatus.RUNNING and b.cached_tokens == 0 and b.prefill_target == 4 + len(outputs_before)
    assert b.output_ids == outputs_before + [7] and s.counters.cached_tokens >= 4  # its prompt block
    while b.status is RequestStatus.RUNNING:
        run_pass(s)
    assert len(b.output_ids) == 8 and s.pool.num_free == 4


def test_without_prefix_cache_nothing_is_found_or_kept():
    s = scheduler(prefix_cache=False)
    s.add(request("a", ids=list(range(10))))
    run_pass(s)
    b = request("b", ids=list(range(10)))
    s.add(b)
    run_pass(s)
    assert b.cached_tokens == 0 and s.pool.cached_blocks == 0 and s.counters.cached_tokens == 0


def test_sizes():
    assert blocks_needed(10, 4) == 3 and blocks_needed(8, 4) == 2


def test_a_request_behind_a_prefill_in_progress_reuses_all_it_shares_with_it():
    s = scheduler(num_blocks=32, batch=4, batched=10)  # 8 prompt tokens a pass at most
    clip = list(range(24))
    q1, q2 = request("q1", ids=clip + [100, 101]), request("q2", ids=clip + [200])
    other = request("other", ids=list(range(300, 305)))
    for r in (q1, q2, other):
        s.add(r)
    sp = run_pass(s)
    # q1's prefill takes the pass's budget; q2 is admitted once q1 has computed (or is computing,
    # in the same pass) every block they share: none is computed twice
    assert [c.request.id for c in sp.chunks] == ["q1"] and q2.status is RequestStatus.WAITING
    while q1.prefilling or q1.status is RequestStatus.WAITING:
        sp = run_pass(s)
    while q2.status is RequestStatus.WAITING:
        run_pass(s)
    assert q2.cached_tokens == 24 and other.status is not RequestStatus.WAITING
    assert list(s.waiting) == []


def test_work_is_shared_out_by_medium_and_each_group_stays_together():
    from modeltest.core import Sample
    from modeltest.work_order import share_by_medium

    def sample(i, video):
        return Sample(id=str(i), subject="s", prompt=f"q{i}", videos=[video] if video else [])

    clips = ["a", "b", "a", "c", "b", "a", None, None]
    todo = [(sample(i, v), f"k{i}") for i, v in enumerate(clips)]
    shares = [share_by_medium(todo, 2, r) for r in range(2)]
    assert [k for _, k in shares[0]] == ["k0", "k2", "k5", "k6"]  # clip a's three, then a text one
    assert [k for _, k in shares[1]] == ["k1", "k4", "k3", "k7"]  # clip b's two, then c, then text
    assert sorted(k for sh in shares for _, k in sh) == sorted(k for _, k in todo)
    assert [k for _, k in share_by_medium(todo, 1, 0)] == ["k0", "k2", "k5", "k1", "k4", "k3", "k6", "k7"]
