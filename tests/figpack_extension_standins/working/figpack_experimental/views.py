"""Stand-in for figpack_experimental.views: ``LossyVideo(frames, fps=...)``.

The real view encodes the frames as an MP4 in ``show()``; this one checks that it was given
what the facts say it takes (uint8 frames x height x width x 3) and records what it got in the
uploaded figure instead: shape, dtype, value range, whether the three channels are equal, a
SHA-256 of the bytes, and fps. The summary is computed in ``show()``, as the real encoding is,
so that constructing the view costs what it costs the real one (nothing).
"""

import hashlib

import numpy as np
from figpack import FigpackView


class LossyVideo(FigpackView):
    def __init__(self, data, fps=30.0):
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 4 or data.shape[3] != 3:
            raise ValueError("LossyVideo takes uint8 frames x height x width x 3, not %s %s"
                             % (getattr(data, "dtype", type(data).__name__), getattr(data, "shape", "")))
        self.data = data
        self.fps = fps

    def record(self):
        data = self.data
        return {
            "shape": list(data.shape),
            "dtype": str(data.dtype),
            "min": int(data.min()),
            "max": int(data.max()),
            "channels_equal": bool((data[..., 0] == data[..., 1]).all() and (data[..., 0] == data[..., 2]).all()),
            "sha256": hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest(),
            "fps": self.fps,
            "fps_type": type(self.fps).__name__,
        }

    def write_to_zarr_group(self, group):
        group.attrs["view_type"] = "figpack_experimental.LossyVideo (stand-in)"
        group.attrs["standin_record"] = self.record()
