"""Direct NCHW convolutions with their element-wise neighbours, register-blocked (`ConvolutionRule`).

A fused convolution kernel (padding, conv, bias/timestep/residual adds) keeps the caller's layout, so the
weights stay the torch tensors. The schedule aims at the machine's matmul peak, where the peers' oneDNN
convolutions run, which MetaSchedule's samples do not reach; measured rates are in benchmarks/HISTORY.md.

Strategy:
0. A 1x1 convolution of stride 1 without padding is a matmul per image and gets matmul.py's packed-panel
   schedule.
1. Inline every element-wise block around the convolution except its padding and the output (epilogue).
2. Register block: output channels x output columns, two vectors of columns and as many channels as the
   profile's accumulators allow, at most MAX_CHANNELS (each channel is a weight broadcast per multiply-add
   row, and more broadcasts than that cost more than the larger block saves), a divisor of the channel
   count (8 x 32 on AVX-512; on AVX2 5 x 16 for 320 channels, 4 x 16 for 128).
3. Parallel loops: where one image's input fits in L2, channel blocks outside rows, so each block's weights
   stay in cache for every row (small, deep levels such as SD1.5's 1280 channels at 16x16); otherwise rows
   outside channel blocks, so the input rows a row reads stay in cache while every channel block passes
   them (large levels such as 320 channels at 64x64). benchmarks/kernel_speed.py times both orders.
4. The padding block gets parallel leading loops.
"""

from __future__ import annotations

from typing import Any

from .blocking import KernelRule, accumulate_in_registers, inline_around, largest_tile, parallel_leading, static_extents
from .matmul import matmul_tiles, panel_blocked, right_hand_read
from .profile import CpuProfile

ITERATORS = "SSSSRRR"
BLOCK_NAME = "conv2d_nchw"
COLUMN_VECTORS = 2
MAX_CHANNELS = 8


def convolution_tiles(out_channels: int, width: int, profile: CpuProfile) -> tuple[int, int]:
    """(output channels, output columns) of one register block."""
    columns = largest_tile(width, COLUMN_VECTORS * profile.lanes)
    most = min(MAX_CHANNELS, profile.accumulators // max(1, columns // profile.lanes))
    return next(c for c in range(min(most, out_channels), 0, -1) if out_channels % c == 0), columns


class ConvolutionRule(KernelRule):
    """A function holding one NCHW convolution and element-wise blocks around it."""

    def schedule(self, sch: Any, profile: CpuProfile) -> bool:
        found = inline_around(sch, BLOCK_NAME, ITERATORS)
        if found is None:
            return False
        conv, output = found
        batch, channel, row, column, *reduction = sch.get_loops(conv)
        extents = static_extents(sch, [channel, row, column, *reduction])
        if extents is None:
            return False
        out_channels, rows, width, in_channels, kernel_rows, kernel_columns = extents
        if (kernel_rows, kernel_columns) == (1, 1) and _pointwise_as_matmul(sch, conv, output, rows, width, profile):
            return True
        channels, columns = convolution_tiles(out_channels, width, profile)
        channel_outer, channel_inner = sch.split(channel, [None, channels])
        column_outer, column_inner = sch.split(column, [None, columns])
        image_bytes = 4 * in_channels * (rows + kernel_rows - 1) * (width + kernel_columns - 1)
        parallel = [batch, channel_outer, row] if image_bytes <= profile.l2_bytes else [batch, row, channel_outer]
        padding = sch.get_producers(conv)
        accumulate_in_registers(sch, conv, output, parallel, column_outer, reduction, channel_inner, column_inner)
        for block in padding:
            loops = sch.get_loops(block)
            parallel_leading(sch, loops[:-1], "S" * (len(loops) - 1))
        return True


def _pointwise_as_matmul(sch: Any, conv: Any, output: Any, rows: int, width: int, profile: CpuProfile) -> bool:
    """Step 0: schedule an unpadded 1x1 convolution of stride 1 as the matmul it is (weights [out, in] times
    each image's [in, rows x columns]); False, leaving `sch` as it was, for any other convolution."""
    producers = sch.get_producers(conv)
    if any(_shapes(sch.get(p).reads[0].source) != _shapes(sch.get(p).writes[0].source) for p in producers):
        return False
    image = right_hand_read(sch, conv, positions=(1, 3, 4))
    if image is None or _shapes(sch.get(conv).reads[image].source)[2:] != [rows, width]:
        return False
    for copy in producers:
        sch.compute_inline(copy)
    image = right_hand_read(sch, conv, positions=(1, 3, 4))
    batch, channel, row, column, *reduction = sch.get_loops(conv)
    tiles = matmul_tiles(int(sch.get(channel).extent), rows * width, profile)
    if tiles is None:
        return False
    panel_blocked(sch, conv, output, [batch], channel, sch.fuse(row, column), reduction, image, tiles, profile)
    return True


def _shapes(tensor: Any) -> list[int]:
    return [int(d) for d in tensor.shape]
