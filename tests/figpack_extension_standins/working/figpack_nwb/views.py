"""Stand-in for figpack_nwb.views: ``PoseEstimation(nwb=..., path=..., use_local_cache=...)``.

Like the real view it reads the NWB file itself through lindi: every node (a subgroup with
``data``) gives ``data[:]`` (T x 2 or T x 3) and its timing (``timestamps``, or ``starting_time``
and its ``rate``); it raises ValueError when the group has no node, a node has no timing, or the
nodes disagree on timing. With ``use_local_cache`` lindi caches under the temporary directory.
What it was given and found is recorded in the uploaded figure.
"""

import os
import tempfile

import h5py
import lindi
import numpy as np
from figpack import FigpackView


class PoseEstimation(FigpackView):
    def __init__(self, *, nwb, path, use_local_cache=False):
        cache_dir = os.path.join(tempfile.gettempdir(), "figpack_nwb_lindi_cache") if use_local_cache else None
        local_cache = lindi.LocalCache(cache_dir=cache_dir) if use_local_cache else None
        with lindi.LindiH5pyFile.from_hdf5_file(nwb, local_cache=local_cache) as f:
            group = f[path]
            nodes, timing = {}, None
            for name in sorted(group.keys()):
                node = group[name]
                if not isinstance(node, h5py.Group) or "data" not in node:
                    continue
                data = np.asarray(node["data"][:])
                if data.ndim != 2 or data.shape[1] not in (2, 3):
                    raise ValueError("node %s: data of shape %s is not T x 2 or T x 3" % (name, data.shape))
                if "timestamps" in node:
                    node_timing = ("timestamps", np.asarray(node["timestamps"][:], dtype=float))
                elif "starting_time" in node:
                    node_timing = ("rate", float(node["starting_time"][()]),
                                   float(node["starting_time"].attrs["rate"]))
                else:
                    raise ValueError("node %s has no timestamps and no starting_time" % name)
                if timing is not None and not _same_timing(timing, node_timing):
                    raise ValueError("the nodes of %s disagree on timing" % path)
                timing = node_timing
                nodes[name] = list(data.shape)
        if not nodes:
            raise ValueError("%s holds no pose estimation series" % path)
        self.recorded = {
            "nwb": nwb, "path": path, "use_local_cache": use_local_cache, "cache_dir": cache_dir,
            "nodes": nodes, "timing": timing[0],
            "rate": timing[2] if timing[0] == "rate" else None,
            "num_timestamps": len(timing[1]) if timing[0] == "timestamps" else None,
        }

    def write_to_zarr_group(self, group):
        group.attrs["view_type"] = "figpack_nwb.PoseEstimation (stand-in)"
        group.attrs["standin_record"] = self.recorded


def _same_timing(a, b):
    if a[0] != b[0]:
        return False
    if a[0] == "timestamps":
        return a[1].shape == b[1].shape and bool(np.array_equal(a[1], b[1]))
    return a[1:] == b[1:]
