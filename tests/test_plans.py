"""The launch arithmetic and kernel choice of the W4A16 and quantize launches (no GPU needed);
which kernels ``launch_w4a16`` queues is in test_routing.py."""
import pytest
from launch_fakes import Recorder, fake_gpu, plan_replay

from fp4cupy import cuda_linear, cuda_wgmma, mma_plan


@pytest.mark.parametrize("sms", [132, 114, 78, 1])
@pytest.mark.parametrize("n,k", [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192), (8192, 28672),
                                 (200, 512), (1000, 64 * 13), (1000, 64 * 9), (300, 64 * 40), (64, 64), (256, 192),
                                 (12544, 4096)])
@pytest.mark.parametrize("known", [False, True])
def test_wgmma_grid_covers_every_chunk_once_in_whole_clusters(n, k, sms, known):
    resident = sms // cuda_wgmma.WG_CLUSTER if known else 0
    blocks, splits, cps = cuda_wgmma.wg_grid(n, k, sms, resident)
    nchunks = k // 64
    rows_per_block = 64 * cuda_wgmma.WG_GROUPS
    if splits == 2:  # the two splits of a block are its cluster: a block a 256 rows, none past N
        assert cps % 2 == 0 and cps < nchunks <= 2 * cps and blocks == -(-n // rows_per_block)
        return
    assert blocks % cuda_wgmma.WG_CLUSTER == 0
    if cps == 0:  # stream-K: every cluster gets at least one pair of chunks; no more than run at once
        tiles = cuda_wgmma.wg_tiles(n)
        assert splits == 1 and 2 * tiles >= resident > 0
        assert blocks // cuda_wgmma.WG_CLUSTER == min(resident, tiles * -(-nchunks // 2))
        return
    assert blocks * rows_per_block >= n
    assert (blocks - cuda_wgmma.WG_CLUSTER) * rows_per_block < n  # no whole cluster past N
    assert cps % 2 == 0 and (splits - 1) * cps < nchunks <= splits * cps  # each split has >= 1 chunk
    if splits > 1:  # the splits of a tile wait for each other: the whole grid runs at once
        assert cps >= 4 and blocks * splits <= (resident * cuda_wgmma.WG_CLUSTER or sms)


def test_wgmma_grid_on_an_h100():
    assert cuda_wgmma.wg_grid(28672, 8192, 132) == (112, 1, 128)  # residency unknown: no stream-K
    assert cuda_wgmma.wg_grid(28672, 8192, 132, 66) == (132, 1, 0)  # stream-K over every SM
    assert cuda_wgmma.wg_grid(14336, 4096, 132, 66) == (56, 2, 32)  # 28 tiles: 2 splits
    assert cuda_wgmma.wg_grid(12544, 4096, 132, 66) == (49, 2, 32)  # 2 splits: 49 blocks of 256 rows
    assert cuda_wgmma.wg_grid(4096, 4096, 132, 66) == (16, 8, 8)
    assert cuda_wgmma.wg_grid(8192, 28672, 132, 66) == (32, 4, 112)
    assert cuda_wgmma.wg_grid(4096, 4096, 132, 50) == (16, 6, 12)  # 100 blocks run at once: 6 splits


def stream_k_runs(tiles, pairs, clusters):
    """The runs (cluster, tile, first pair, end pair) of w4a16_wgmma.cu's stream-K split, as the
    kernel walks them: cluster c takes units [U c / C, U (c + 1) / C) of U = tiles * pairs."""
    first = [tiles * pairs * c // clusters for c in range(clusters + 1)]
    runs = []
    for c in range(clusters):
        u = first[c]
        while u < first[c + 1]:
            t, p = divmod(u, pairs)
            end = min(first[c + 1], (t + 1) * pairs)
            runs.append((c, t, p, end - t * pairs))
            u = end
    return first, runs


@pytest.mark.parametrize("tiles,pairs,clusters", [(56, 64, 66), (28, 32, 66), (2, 7, 5), (2, 7, 14), (1, 3, 2),
                                                  (3, 1, 2), (128, 64, 66), (22, 224, 66)])
def test_stream_k_runs_cover_each_tile_once_and_owners_find_every_partial(tiles, pairs, clusters):
    first, runs = stream_k_runs(tiles, pairs, clusters)
    for t in range(tiles):
        parts = sorted((p0, p1, c) for c, tt, p0, p1 in runs if tt == t)
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))  # the tile's pairs once each, in order
        assert parts[0][0] == 0 and parts[-1][1] == pairs
        owner = parts[0][2]
        # the owner's list, as the kernel walks it: clusters after it that start inside the tile
        found = [c for c in range(owner + 1, clusters) if first[c] < (t + 1) * pairs]
        assert found == [c for _, _, c in parts[1:]]
        for c in found:  # a partial is its cluster's first run: one slot a block is enough
            assert next(r for r in runs if r[0] == c)[1:3] == (t, first[c] - t * pairs)
    for c in range(clusters):  # only a cluster's last run may be an owner's cut run, only its first a partial
        mine = [r for r in runs if r[0] == c]
        assert all(p0 == 0 for _, _, p0, _ in mine[1:]) and all(p1 == pairs for _, _, _, p1 in mine[:-1])
    if 2 * tiles >= clusters:  # as wg_grid takes stream-K
        assert max(sum(1 for r in runs if r[1] == t) for t in range(tiles)) <= 3


def test_warpgroup_token_tile_is_the_least_that_holds_the_tokens():
    tiles = cuda_wgmma.WG_TOKEN_TILES
    assert tiles == tuple(sorted(tiles)) and tiles[-1] == cuda_linear.MMA_MAX_M and all(t % 8 == 0 for t in tiles)
    for m in range(1, cuda_linear.MMA_MAX_M + 1):
        nt = cuda_wgmma.wg_token_tile(m)
        assert nt >= m and all(t < m for t in tiles if t < nt), m
    assert [cuda_wgmma.wg_token_tile(m) for m in (17, 24, 25, 33, 64, 65, 113, 128)] == [24, 24, 32, 48, 64, 80, 128, 128]


@pytest.mark.parametrize("n,blocks,zeroed", [(28672, 132, 132), (28672, 112, 0), (1000, 6, 8)])
def test_stream_k_launch_sizes_flags_and_partial_slots(monkeypatch, n, blocks, zeroed):
    calls, buffers = [], []
    k, m = 8192, 128
    monkeypatch.setattr(cuda_linear, "_wg_ok", lambda device: True)
    monkeypatch.setattr(cuda_linear, "WG_MIN_WEIGHTS", 0)  # 1000 rows too
    monkeypatch.setattr(cuda_wgmma, "wg_plan", lambda n, k, m, bf16, device: cuda_wgmma.WgPlan(
        xprep=Recorder("xprep", calls), launch=Recorder("wg", calls),
        grid=(blocks, 1), threads=512, shared=99, cps=0, nt=128, name="wg"))

    def scratch(nbytes):
        buffers.append(nbytes)
        return object(), 1000 * len(buffers)

    cuda_linear.launch_w4a16(m, n, k, False, 0, 77, (11, 12, 13, 14, 0, 16), scratch)
    assert [c[0] for c in calls] == ["xprep", "wg+after"]
    words = zeroed + blocks * 512 * 64 if zeroed else 0  # flags (rounded up to 4), then a slot a block
    assert buffers == [(k + 64) * 128 * 2] + ([4 * words] if words else [])
    assert calls[0][5][2:4] == ((2000 if words else 0), zeroed)


def test_split_k_workspace_and_kernel_names():
    def plan(grid, cps):
        return cuda_wgmma.WgPlan(xprep=None, launch=None, grid=grid, threads=512, shared=99, cps=cps, nt=128, name="wg")
    assert plan((56, 2), 32).workspace(14336, 128) == (0, 0)  # two splits add up in shared memory
    assert plan((16, 8), 8).workspace(4096, 128) == (16 + 16 * 8 * 512 * 64, 16)  # counters, then a slot a block
    assert plan((16, 1), 64).workspace(4096, 128) == (0, 0)  # a tile a cluster
    assert [cuda_wgmma.wg_kernel_name(24, True, loop) for loop in cuda_wgmma.WG_LOOPS] == [
        "w4a16_wg_nt24_bf16", "w4a16_wgsk_nt24_bf16", "w4a16_wgk2_nt24_bf16"]
    with pytest.raises(ValueError, match="no warpgroup kernel loop 'k3'"):
        cuda_wgmma.wg_kernel_name(24, True, "k3")


@pytest.mark.parametrize("n,itemsize", [(1, 2), (2048, 2), (2049, 2), (8192 * 8192, 2), (8192 * 8192, 4), (100, 4)])
def test_amax_grid_reads_every_element_with_at_most_8_blocks_a_sm(n, itemsize):
    from fp4cupy import cuda_ops

    grid = cuda_ops.amax_grid(n * itemsize, 132)
    loads = 16 // itemsize  # elements a thread reads a step
    assert 1 <= grid <= 8 * 132
    assert grid == 8 * 132 or grid * cuda_ops.THREADS * loads >= n > (grid - 1) * cuda_ops.THREADS * loads


@pytest.mark.parametrize("n,k,m,bf16,want,warps", [
    (14336, 4096, 1, False, "w4a16_rt1_nt1_u2_w4_f16", 4),
    (13824, 5120, 8, False, "w4a16_rt1_nt1_u2_w4_f16", 4),
    (16384, 4096, 1, False, "w4a16_rt2_nt1_u2_f16", 8),
    (11008, 4096, 1, False, "w4a16_rt1_nt1_u2_f16", 4),   # 688 one-tile blocks: one wave at six a SM
    (11008, 4096, 1, True, "w4a16_rt2_nt1_u2_bf16", 8),   # ... but not at five
    (10240, 8192, 8, True, "w4a16_rt1_nt1_u2_bf16", 4),
    (8448, 4096, 1, False, "w4a16_rt2_nt1_u2_f16", 8),    # 264 two-tile blocks: already one wave
    (18944, 4096, 1, True, "w4a16_rt1_nt1_u2_bf16", 4),     # 9 one-tile blocks a SM against 5 x 2 tiles: 5 + 4
    (22016, 8192, 8, True, "w4a16_rt1_nt1_u2_w4_bf16", 4),  # 11 blocks: 7 + 4 at seven a SM, 5 + 5 + 1 at five
    (22016, 4096, 1, False, "w4a16_rt1_nt1_u2_f16", 4),     # ... 6 + 5 at six a SM, fuller than 7 + 4
    (30720, 4096, 1, False, "w4a16_rt1_nt1_u2_f16", 4),     # 15 blocks: 6 + 6 + 3 against 7 + 7 + 1
    (56320, 4096, 1, False, "w4a16_rt2_nt1_u1_w4_f16", 4),  # 27 a SM: the tile saved is worth less
    (28672, 8192, 1, False, "w4a16_rt2_nt1_u1_w4_f16", 4),  # 896 blocks: 97% of one wave at seven a SM
    (57344, 8192, 4, False, "w4a16_rt2_nt1_u1_w4_f16", 4),  # 1792: 97% of two (85% of 3.4 at four)
    (32768, 8192, 1, False, "w4a16_rt2_nt1_u2_f16", 4),     # 1024: 97% of two waves at four a SM
    (28672, 8192, 1, True, "w4a16_rt2_nt1_u2_bf16", 4),     # bf16 measured equal
    (4096, 4096, 1, False, "w4a16_rt1_nt1_u2_f16", 8),
    (14336, 4096, 16, False, "w4a16_rt1_nt2_u1_w4_f16", 4),  # 896 one-tile blocks: one wave at seven a SM
    (14336, 4096, 12, True, "w4a16_rt1_nt2_u1_w4_bf16", 4),
    (16384, 4096, 16, True, "w4a16_rt2_nt2_u1_bf16", 8),
    (10240, 8192, 16, True, "w4a16_rt2_nt2_u1_bf16", 8),
    (12288, 4096, 12, False, "w4a16_rt2_nt2_u1_f16", 8),
    (8192, 28672, 16, True, "w4a16_rt2_nt2_u1_bf16", 16),    # 256: the capped 16 warps stay
    (28672, 8192, 16, True, "w4a16_rt2_nt2_u1_bf16", 8),     # 896 two-tile blocks: 8 warps in either dtype
    (24576, 4096, 16, True, "w4a16_rt2_nt2_u1_bf16", 8),
    (32768, 4096, 16, True, "w4a16_rt2_nt2_u1_bf16", 8),
    (28672, 8192, 16, False, "w4a16_rt2_nt2_u1_f16", 8),
    (8192, 28672, 1, False, "w4a16_rt2_nt1_u2_f16", 8),
    (8192, 28672, 16, False, "w4a16_rt2_nt2_u1_f16", 16)])
def test_mma_plan_on_132_sms(monkeypatch, n, k, m, bf16, want, warps):
    """At M <= 16: the capped one-tile 4-warp kernel where its blocks fill one wave 90-100% (seven a
    SM); the capped two-tile one (fp16 at M <= 8, bf16 above) where its last wave is fuller than
    the two-tile grid's. At M <= 8: the uncapped one-tile kernel where the two-tile grid takes more
    than one wave and its own fits in one, and never 16 warps of the two-tile kernel (one such
    block a SM); above 8 tokens 16 stay."""
    fake_gpu(monkeypatch, 132)
    p = mma_plan.plan(n, k, m, bf16, 0)
    mma_plan.plan.cache_clear()
    assert (p.name, p.threads // 32) == (want, warps)


def test_mma_plan_without_occupancy_keeps_the_two_tile_kernel(monkeypatch):
    fake_gpu(monkeypatch, 132)
    monkeypatch.setattr(mma_plan, "_blocks_per_sm", lambda *a: 0)  # the driver could not say
    assert mma_plan.plan(11008, 4096, 1, False, 0).name == "w4a16_rt2_nt1_u2_f16"
    mma_plan.plan.cache_clear()


@pytest.mark.parametrize("sms", [132, 114, 78, 46])
def test_every_mma_plan_fits_its_kernel(monkeypatch, sms):
    fake_gpu(monkeypatch, sms)
    names = {mma_plan.kernel_name(*v, bf16): v for v in mma_plan.VARIANTS for bf16 in (False, True)}
    for n in (8, 1000, 4096, 8448, 13824, 14336, 28672):
        for k in (64, 4096, 28672):
            for m in (1, 7, 8, 16, 32, 33):
                for bf16 in (False, True):
                    p = mma_plan.plan(n, k, m, bf16, 0)
                    rt, nt, u, max_warps = names[p.name]
                    assert 1 <= p.threads // 32 <= max_warps and p.shared <= mma_plan.SHARED_LIMIT
                    assert p.grid == (-(-m // (8 * nt)), -(-(-(-n // 16)) // rt))
    mma_plan.plan.cache_clear()


def fake_cluster_gpu(monkeypatch, cc=(9, 0), known=True):
    """plan() on 132 SMs of compute capability ``cc`` whose blocks and clusters that run at once are
    an H200's (benchmarks/plan_replay.py), or unknown to the driver."""
    monkeypatch.setattr(mma_plan, "_sm_count", lambda device: 132)
    monkeypatch.setattr(mma_plan.runtime, "compute_capability", lambda device: cc)
    monkeypatch.setattr(mma_plan.runtime, "launcher", lambda *a: None)
    monkeypatch.setattr(mma_plan, "_resident_blocks", plan_replay.h200_resident if known else lambda *a: 0)
    mma_plan.plan.cache_clear()


@pytest.mark.parametrize("n,k,m,bf16,want,warps", [
    (512, 28672, 1, False, "w4a16_rt1_nt1_u2_s8_f16", 4),     # 32 tiles: 8 x 4 warps, 256 blocks
    (1024, 28672, 1, False, "w4a16_rt1_nt1_u2_s4_f16", 8),    # 8 x 4 is as many warps but 512 blocks
    (1024, 28672, 1, True, "w4a16_rt1_nt1_u2_s8_bf16", 4),    # 4 x 8 in bf16: 62 clusters of 4, not 64
    (1280, 8192, 1, True, "w4a16_rt1_nt1_u2_s4_bf16", 4),
    (2560, 4096, 1, True, "w4a16_rt1_nt1_u2_bf16", 8),        # short K over half the SMs: no split
    (4608, 3584, 1, False, "w4a16_rt1_nt1_u2_f16", 8),        # (Qwen2.5-7B's fused qkv: S=2 lost 10%)
    (4608, 3584, 1, True, "w4a16_rt1_nt1_u2_bf16", 4),
    (1024, 4096, 1, False, "w4a16_rt1_nt1_u2_s4_f16", 8),     # 64 tiles: under half the SMs, split
    (2560, 5120, 1, False, "w4a16_rt1_nt1_u2_f16", 8),        # 80 chunks are short too
    (2560, 6144, 1, False, "w4a16_rt1_nt1_u2_s4_f16", 4),     # 96 keep their splits (mixed there)
    (1280, 4096, 32, False, "w4a16_rt1_nt4_u1_s4_f16", 4),    # 17-32 tokens keep their splits
    (2560, 8192, 16, False, "w4a16_rt1_nt2_u2_s2_f16", 4),
    (2048, 8192, 16, False, "w4a16_rt1_nt2_u2_s2_f16", 8),
    (3072, 28672, 1, False, "w4a16_rt1_nt1_u2_s2_f16", 8),
    (4096, 8192, 1, False, "w4a16_rt1_nt1_u2_f16", 8),        # 2 x 4 ties, but at 3.9 blocks a SM
    (1024, 8192, 32, False, "w4a16_rt1_nt4_u1_s8_f16", 4),
    (1024, 2048, 1, False, "w4a16_rt1_nt1_u2_s4_f16", 4),     # at least 8 chunks a block, 2 a warp
    (1024, 512, 1, False, "w4a16_rt1_nt1_u2_f16", 4),
    (1024, 256, 1, False, "w4a16_rt1_nt1_u2_f16", 2),         # 4 chunks: none qualifies; two a warp
    (1000, 64, 16, False, "w4a16_rt1_nt2_u2_f16", 1),
    (6144, 4096, 1, False, "w4a16_rt1_nt1_u2_f16", 8),       # 3 blocks a SM, against 2 of two tiles
    (6144, 4096, 1, True, "w4a16_rt1_nt1_u2_bf16", 4),
    (4608, 14336, 1, False, "w4a16_rt1_nt1_u2_s2_f16", 4),    # 5 blocks a SM of half a K
    (4224, 8192, 16, False, "w4a16_rt1_nt2_u2_f16", 8),       # as many warps as 16 of two tiles
    (7168, 8192, 1, False, "w4a16_rt2_nt1_u2_f16", 8),        # as much work a SM: the fewer blocks
    (7168, 8192, 16, False, "w4a16_rt2_nt2_u1_f16", 16),
    (8192, 28672, 1, False, "w4a16_rt2_nt1_u2_f16", 8),
    (8448, 8192, 16, False, "w4a16_rt2_nt2_u1_f16", 16),      # 264 blocks of 16 warps: one wave
    (8448, 8192, 1, True, "w4a16_rt2_nt1_u2_bf16", 8)])
def test_one_wave_plan_takes_the_least_work_a_sm_then_the_most_warps(monkeypatch, n, k, m, bf16, want, warps):
    """Below 64 rows a SM: of the launches whose blocks all run at once, the least work on the
    busiest SM, then the most warps (benchmarks/split_sweep.py's best, or within 4% of it, on an H200)."""
    fake_cluster_gpu(monkeypatch)
    p = mma_plan.plan(n, k, m, bf16, 0)
    mma_plan.plan.cache_clear()
    splits = int(p.name.split("_s")[1].split("_")[0]) if "_s" in p.name else 1
    assert (p.name, p.threads // 32) == (want, warps)
    rt = int(p.name[len("w4a16_rt")])
    nt = {1: 1, 16: 2, 32: 4}[m]
    assert p.grid == (splits, -(-n // (16 * rt))) and p.shared == (warps + (splits > 1)) * rt * nt * 512


@pytest.mark.parametrize("cc,known", [((8, 0), True), ((9, 0), False)])
def test_few_row_plan_without_clusters_or_occupancy_is_unsplit_8_warps(monkeypatch, cc, known):
    fake_cluster_gpu(monkeypatch, cc, known)
    p = mma_plan.plan(1024, 28672, 1, False, 0)
    mma_plan.plan.cache_clear()
    assert (p.name, p.threads // 32, p.grid) == ("w4a16_rt1_nt1_u2_f16", 8, (1, 64))


def test_split_plans_name_a_built_kernel():
    with pytest.raises(ValueError, match=r"splits K over 3 .*S in \(2, 4, 8\)"):
        mma_plan.make_plan(1024, 1, mma_plan.SPLIT_VARIANTS[1], 4, False, 0, 3)
    with pytest.raises(ValueError, match="no kernel splits"):
        mma_plan.make_plan(1024, 1, (2, 1, 2, 16), 4, False, 0, 2)


REPLAY_ROWS = """\
| f16 | 4608x3584 | 1 | 10.9 | rt1_nt1_u2_s2_f16 4w 6.3 (1.73x) | s1 8w 5.7 | 1.10 | s1 4w 6.0, s1 8w 5.7, s2 4w 6.3 |
| bf16 | 512x28672 | 16 | 9.1 | rt1_nt2_u2_s8_bf16 4w 8.2 (1.11x) | s8 4w 8.2 | 1.00 | s1 4w 18.0, s8 4w 8.2 |
| f16 | 4096x4096 | 128 | 14.1 | w4a16_wg_nt128_f16 4w 19.0 (0.74x) | s1 4w 19.0 | 1.00 | s1 4w 19.0 |
"""


def test_plan_replay_scores_the_plan_on_recorded_sweeps(monkeypatch):
    """benchmarks/plan_replay.py: today's pick's time over the row's best, with the H200 faked (and
    restored after); a rule change moves the score; rows beyond mma.sync (M > 32) are left out."""
    real = mma_plan._sm_count, mma_plan._resident_blocks
    rows = plan_replay.read_rows(REPLAY_ROWS.splitlines())
    assert [(r["n"], r["k"], r["m"], r["bf16"]) for r in rows] == [(4608, 3584, 1, False), (512, 28672, 16, True),
                                                                     (4096, 4096, 128, False)]
    scored, untimed = plan_replay.score(rows)
    assert [(pick, round(s, 3)) for _, pick, s in scored] == [("s1 8w", 1.0), ("s8 4w", 1.0)] and untimed == 0
    monkeypatch.setattr(mma_plan, "SHORT_K_CHUNKS", 0)  # the rule before session 19: split at short K
    scored, _ = plan_replay.score(rows)
    assert (scored[0][1], round(scored[0][2], 3)) == ("s2 4w", round(6.3 / 5.7, 3))
    assert (mma_plan._sm_count, mma_plan._resident_blocks) == real  # the fakes are gone again
    (row,) = plan_replay.read_jsonl(['{"dtype": "bf16", "n": 512, "k": 28672, "m": 16, "us": {"cuBLAS": 9.1, '
                                     '"plan": 8.2, "s1 4w": 18.0, "s8 4w": 8.2}, "plan": "x"}', ""])
    assert row == dict(bf16=True, n=512, k=28672, m=16, times={"s1 4w": 18.0, "s8 4w": 8.2})
