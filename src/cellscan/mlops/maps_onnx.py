"""The numpy scoring after the networks, as a second ONNX graph (``maps.onnx`` in an ONNX export).

:func:`cellscan.core.scoring.anomaly_maps` and the head's smoothing cost as much as the networks
themselves once those run in ONNX Runtime: SSIM's five local means, the per-pixel standardisation
and two Gaussian smoothings, in scipy. This graph computes the same two maps in ONNX Runtime:

    x, recon (N, H, W, C), head probability (N, H, W)  ->  map (N, H, W), head_map (N, H, W)

Gaussian filters are separable, with scipy's kernel (``truncate=3.5``) and scipy's ``reflect`` border
(``d c b a | a b c d``): banded matrices with the border folded in, or reflected edges and depthwise
convolutions on long axes. The maps equal scipy's to float32 rounding; the export's parity check
compares them. The graph is built for one set of score parameters (the version's);
:class:`cellscan.core.bundle.CellscanModel` falls back to numpy for any other. Image scores, fusion
and the whole-image view stay in numpy (a few values per image).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx

    from cellscan.core.config import ScoreParams
    from cellscan.core.scoring import MapStats

_TRUNCATE = 3.5  # as cellscan.core.scoring._blur
_C1, _C2 = 0.01**2, 0.03**2
_SSIM_SIGMA = 1.5
KINDS = ("l2", "ssim", "l2_ssim")  # score.map values the graph computes
DENSE_MAX = 192  # longest axis blurred by a dense banded MatMul (see _Graph.blur)


def gaussian_kernel(sigma: float) -> np.ndarray:
    """scipy.ndimage.gaussian_filter1d's kernel at ``truncate=3.5``."""
    radius = int(_TRUNCATE * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / (sigma * sigma) * x * x)
    return (phi / phi.sum()).astype(np.float32)


def reflect_indices(n: int, radius: int) -> np.ndarray:
    """Indices of an axis of length ``n`` padded by ``radius`` in scipy's ``reflect`` mode."""
    return np.pad(np.arange(n), radius, mode="symmetric").astype(np.int64)


class _Graph:
    """A small builder: constants and nodes with generated names."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._n = 0

    def name(self, stem: str) -> str:
        self._n += 1
        return f"{stem}_{self._n}"

    def const(self, value: np.ndarray, stem: str = "c") -> str:
        from onnx import numpy_helper

        name = self.name(stem)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], stem: str | None = None, outputs: int = 1, **attrs: Any) -> Any:
        from onnx import helper

        outs = [self.name(stem or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, **attrs))
        return outs[0] if outputs == 1 else outs

    def reflect(self, t: str, axis: int, n: int, r: int) -> str:
        """Pad ``axis`` (length ``n``) by ``r`` on both sides in scipy's ``reflect`` mode.

        Slices of reversed edges where ``r <= n`` (a copy); a ``Gather`` of :func:`reflect_indices`
        otherwise (repeated reflection; ten times slower, for images smaller than the kernel).
        """
        if r == 0:
            return t
        if r > n:
            return self.op("Gather", [t, self.const(reflect_indices(n, r), "idx")], axis=axis)
        ax, step = self.const(np.array([axis], np.int64)), self.const(np.array([-1], np.int64))
        first = self.op("Slice", [t, self.const(np.array([r - 1], np.int64)), self.const(np.array([-n - 1], np.int64)),
                                  ax, step])
        last = self.op("Slice", [t, self.const(np.array([n - 1], np.int64)),
                                 self.const(np.array([n - r - 1 if n - r - 1 >= 0 else -n - 1], np.int64)), ax, step])
        return self.op("Concat", [first, t, last], axis=axis)

    def blur(self, t: str, channels: int, sigma: float, shape: tuple[int, int]) -> str:
        """Gaussian blur of an (N, channels, H, W) tensor over H and W, scipy's reflect border.

        Along an axis up to ``DENSE_MAX`` long, one ``MatMul`` with a banded matrix that has the
        reflection folded in (twice as fast as scipy at 128 px); longer axes (where the dense matrix
        costs more than it saves), reflected edges and a depthwise ``Conv``.
        """
        k = gaussian_kernel(sigma)
        for axis, n in ((2, shape[0]), (3, shape[1])):
            if n <= DENSE_MAX:
                band = blur_matrix(n, k)  # out = band @ v along the axis
                t = (self.op("MatMul", [self.const(band, "band"), t]) if axis == 2
                     else self.op("MatMul", [t, self.const(np.ascontiguousarray(band.T), "band")]))
            else:
                t = self.reflect(t, axis, n, len(k) // 2)
                kshape = (1, 1, -1, 1) if axis == 2 else (1, 1, 1, -1)
                t = self.op("Conv", [t, self.const(np.tile(k.reshape(kshape), (channels, 1, 1, 1)), "k")],
                            group=channels)
        return t


def blur_matrix(n: int, k: np.ndarray) -> np.ndarray:
    """(n, n) matrix applying the kernel ``k`` along an axis of length ``n`` with scipy's reflect border."""
    r = len(k) // 2
    idx = reflect_indices(n, r)
    band = np.zeros((n, n), np.float64)
    rows = np.repeat(np.arange(n), len(k))
    cols = idx[np.arange(n)[:, None] + np.arange(len(k))[None, :]].ravel()
    np.add.at(band, (rows, cols), np.tile(k.astype(np.float64), n))
    return band.astype(np.float32)


def build_maps_graph(shape: tuple[int, int], channels: int, p: ScoreParams, stats: MapStats | None,
                     head: bool, opset: int = 17) -> onnx.ModelProto:
    """The graph computing :func:`~cellscan.core.scoring.anomaly_maps` and the smoothed head map."""
    from onnx import TensorProto, helper

    if p.map not in KINDS:
        msg = f"no ONNX graph for map {p.map!r}"
        raise ValueError(msg)
    g = _Graph()
    h, w = shape
    c = channels
    x = g.op("Transpose", ["x"], "xt", perm=[0, 3, 1, 2])  # (N, C, H, W)
    y = g.op("Transpose", ["recon"], "yt", perm=[0, 3, 1, 2])
    parts: dict[str, str] = {}
    if p.map in ("l2", "l2_ssim"):
        d = g.op("Sub", [x, y])
        parts["l2"] = g.op("ReduceMean", [g.op("Mul", [d, d])], "l2", axes=[1], keepdims=0)
    if p.map in ("ssim", "l2_ssim"):
        # Centred on 0.5 as in numpy: float32 variances lose less to cancellation.
        half = g.const(np.float32(0.5))
        xc, yc = g.op("Sub", [x, half]), g.op("Sub", [y, half])
        xx, yy, xy = g.op("Mul", [xc, xc]), g.op("Mul", [yc, yc]), g.op("Mul", [xc, yc])
        stack = g.op("Concat", [xc, yc, xx, yy, xy], axis=1)
        means = g.blur(stack, 5 * c, _SSIM_SIGMA, shape)
        mx, my, mxx, myy, mxy = g.op("Split", [means, g.const(np.full(5, c, np.int64), "split")], axis=1, outputs=5)
        # local covariances from the centred means; the luminance term from the true means
        sxx = g.op("Sub", [mxx, g.op("Mul", [mx, mx])])
        syy = g.op("Sub", [myy, g.op("Mul", [my, my])])
        sxy = g.op("Sub", [mxy, g.op("Mul", [mx, my])])
        mx, my = g.op("Add", [mx, half]), g.op("Add", [my, half])
        mx2, my2, mxmy = g.op("Mul", [mx, mx]), g.op("Mul", [my, my]), g.op("Mul", [mx, my])
        two, c1, c2 = g.const(np.float32(2.0)), g.const(np.float32(_C1)), g.const(np.float32(_C2))
        num = g.op("Mul", [g.op("Add", [g.op("Mul", [two, mxmy]), c1]), g.op("Add", [g.op("Mul", [two, sxy]), c2])])
        den = g.op("Mul", [g.op("Add", [g.op("Add", [mx2, my2]), c1]), g.op("Add", [g.op("Add", [sxx, syy]), c2])])
        s = g.op("ReduceMean", [g.op("Div", [num, den])], "ssim", axes=[1], keepdims=0)
        parts["ssim"] = g.op("Div", [g.op("Sub", [g.const(np.float32(1.0)), s]), two])
    combined = None
    for k, m in parts.items():
        if p.normalize and stats is not None and k in stats.mean:
            m = g.op("Div", [g.op("Sub", [m, g.const(stats.mean[k].astype(np.float32), f"{k}_mean")]),
                             g.const(stats.std[k].astype(np.float32), f"{k}_std")])
        m = g.op("Div", [m, g.const(np.float32(len(parts)))])
        combined = m if combined is None else g.op("Add", [combined, m])
    assert combined is not None
    axis1 = g.const(np.array([1], np.int64), "axis1")
    if p.smooth_sigma > 0:
        combined = g.op("Squeeze", [g.blur(g.op("Unsqueeze", [combined, axis1]), 1, p.smooth_sigma, shape), axis1])
    g.nodes.append(helper.make_node("Identity", [combined], ["map"]))
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", h, w, c]) for n in ("x", "recon")]
    outputs = [helper.make_tensor_value_info("map", TensorProto.FLOAT, ["N", h, w])]
    if head:
        hm = "prob"
        if p.head_sigma > 0:
            hm = g.op("Squeeze", [g.blur(g.op("Unsqueeze", [hm, axis1]), 1, p.head_sigma, shape), axis1])
        g.nodes.append(helper.make_node("Identity", [hm], ["head_map"]))
        inputs.append(helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", h, w]))
        outputs.append(helper.make_tensor_value_info("head_map", TensorProto.FLOAT, ["N", h, w]))
    graph = helper.make_graph(g.nodes, "cellscan_maps", inputs, outputs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="cellscan")
    model.ir_version = min(model.ir_version, 8)  # what onnxruntime 1.x reads for opset 17
    return model
