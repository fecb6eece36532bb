"""The launch arithmetic of the W4A16 kernels (no GPU needed): every K chunk is covered once."""
import pytest

from fp4cupy import cuda_linear


@pytest.mark.parametrize("sms", [132, 114, 78, 1])
@pytest.mark.parametrize("n,k", [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192), (8192, 28672),
                                 (200, 512), (1000, 64 * 13), (300, 64 * 40), (64, 64), (256, 192)])
def test_wgmma_grid_covers_every_chunk_once_in_whole_clusters(n, k, sms):
    blocks, splits, cps = cuda_linear.wg_grid(n, k, sms)
    nchunks = k // 64
    rows_per_block = 64 * cuda_linear.WG_GROUPS
    assert blocks % cuda_linear.WG_CLUSTER == 0 and blocks * rows_per_block >= n
    assert (blocks - cuda_linear.WG_CLUSTER) * rows_per_block < n  # no whole cluster past N
    assert cps % 2 == 0 and (splits - 1) * cps < nchunks <= splits * cps  # each split has >= 1 chunk
    if splits > 1:
        assert cps >= 4 and blocks * splits <= max(sms, blocks)  # about one block a SM


def test_wgmma_grid_on_an_h100():
    assert cuda_linear.wg_grid(28672, 8192, 132) == (112, 1, 128)
    assert cuda_linear.wg_grid(4096, 4096, 132) == (16, 8, 8)
    assert cuda_linear.wg_grid(8192, 28672, 132) == (32, 4, 112)
