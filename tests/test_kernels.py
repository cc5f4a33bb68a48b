"""Pure kernels: the test-time noise drawn by torch is the numpy hash, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellulus_scale.kernels.noise import position_uniform, position_uniform_torch, reflect_indices

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_torch_noise_is_the_numpy_noise_bit_for_bit(device: str) -> None:
    rows = reflect_indices(-44, 300, 257)[:, None]  # reflected, so indices repeat
    columns = np.arange(2**40, 2**40 + 123)[None, :]  # large coordinates use all 64 bits
    depth = np.arange(3)[:, None, None]
    for seed, frame, tta_pass in [(0, 0, 0), (7, 123_456, 31), (2**31, 5, 0xFFFF)]:
        for grids in ([rows, columns], [depth, rows, columns[:, :17]]):
            expected = position_uniform(seed, frame, tta_pass, grids)
            drawn = position_uniform_torch(seed, frame, tta_pass, grids, device).cpu().numpy()
            assert drawn.dtype == np.float64 and drawn.shape == expected.shape
            np.testing.assert_array_equal(drawn, expected)
            assert drawn.min() >= 0.0 and drawn.max() < 1.0
    # different passes draw different noise
    assert not np.array_equal(
        position_uniform_torch(1, 2, 3, [rows, columns], device).cpu().numpy(),
        position_uniform_torch(1, 2, 4, [rows, columns], device).cpu().numpy(),
    )


def test_gpu_batches_of_passes_fit_the_pixel_budget_and_split_evenly() -> None:
    from cellulus_scale.kernels.oce import GPU_BATCH_PIXELS, passes_per_batch

    assert passes_per_batch(8, 556 * 556, "cpu") == 8
    for passes in (1, 2, 8, 16, 32):
        for side in (100, 300, 556, 1068, 3000):
            batch = passes_per_batch(passes, side * side, "cuda")
            assert 1 <= batch <= passes
            assert batch == 1 or batch * side * side <= GPU_BATCH_PIXELS
            batches = -(-passes // batch)
            assert batches * batch - passes < batches  # split evenly: batches differ by <= 1
    assert passes_per_batch(8, 300 * 300, "cuda") == 8  # a 256 block: all passes at once


def test_precision_is_checked_and_the_cpu_computes_in_float32() -> None:
    from cellulus_scale.config import SegmentationConfig
    from cellulus_scale.errors import UserInputError
    from cellulus_scale.kernels.inference import inference_precision

    with pytest.raises(UserInputError, match="unknown precision 'half'"):
        SegmentationConfig(diameter=24, precision="half")
    flags = (torch.backends.cudnn.allow_tf32, torch.is_autocast_enabled())
    layer = torch.nn.Conv2d(1, 2, 3)
    image = torch.rand(1, 1, 9, 9)
    with torch.no_grad():
        reference = layer(image)
        for precision in ("tf32", "bfloat16"):
            with inference_precision("cpu", precision):
                out = layer(image)
            assert out.dtype == torch.float32 and torch.equal(out, reference)
    assert (torch.backends.cudnn.allow_tf32, torch.is_autocast_enabled()) == flags
