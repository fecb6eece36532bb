"""The tiled W4A16 kernel's launch arithmetic (no GPU needed; tests/test_plans.py checks when
linear takes it)."""
import pytest

from fp4cupy import cuda_tiled


@pytest.mark.parametrize("nchunks", [1, 7, 9, 16, 37, 64, 128, 448])
@pytest.mark.parametrize("blocks,resident", [(1, 264), (4, 264), (8, 264), (16, 264), (64, 264), (224, 264),
                                             (448, 264), (32, 216), (5, 132)])
def test_splits_cover_every_chunk_once_within_the_resident_blocks(nchunks, blocks, resident):
    splits, cps = cuda_tiled.tiled_splits(blocks, nchunks, resident, 132)
    assert (splits - 1) * cps < nchunks <= splits * cps  # every split has a chunk, every chunk a split
    if splits == 1:
        return
    few = cps < cuda_tiled.MIN_CHUNKS_A_SPLIT  # at most one block a SM, then
    assert cps >= cuda_tiled.MIN_CHUNKS_A_SPLIT // 2 and blocks * splits <= (132 if few else resident)
    assert splits & (splits - 1) == 0 or -(-nchunks // cps) < splits <= 2 * -(-nchunks // cps)


@pytest.mark.parametrize("blocks,nchunks,want", [(8, 64, 16), (16, 64, 8), (4, 128, 32), (16, 224, 16), (32, 64, 8),
                                                 (24, 64, 8), (112, 128, 2), (224, 128, 1), (48, 64, 4)])
def test_splits_on_an_h200(blocks, nchunks, want):
    """132 SMs, two blocks a SM: the picks timed in RESULTS.md (session 20), 2048x4096 at 33-64
    tokens (8 blocks) taking 16 splits of 4 chunks."""
    assert cuda_tiled.tiled_splits(blocks, nchunks, 264, 132)[0] == want


def test_shared_memory_fits_two_blocks_a_sm_on_hopper_and_ampere():
    """x (64 tokens x 128 bytes), codes (16 tiles x 512) and scale codes (16 x 64), three chunks:
    52 KB, two blocks on an H100/H200 (228 KB a SM) or A100 (164 KB), one on Ada (100 KB)."""
    assert cuda_tiled.TILED_SHARED == 3 * (64 * 128 + 16 * 576) == 52224
    assert 100 * 1024 < 2 * (cuda_tiled.TILED_SHARED + 1024) <= 164 * 1024  # 1 KB reserved a block
