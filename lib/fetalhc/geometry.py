"""Ellipse geometry: the one place where masks become ellipses and ellipses become millimetres.

Conventions (HC18 / OpenCV image convention): x runs along columns, y along rows, origin at the
centre of the top-left pixel for pixel coordinates; the angle is that of semi-axis ``a`` measured
from +x toward +y, in radians, folded into [0, pi). ``a >= b`` always.
Spacing is ``(row_mm, col_mm)`` = (dy, dx), as in DICOM PixelSpacing.

numpy only (no OpenCV): this module runs unchanged inside 3D Slicer, which ships numpy but not cv2.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Ellipse:
    cx: float
    cy: float
    a: float  # semi-major axis
    b: float  # semi-minor axis
    angle: float  # radians, semi-axis a from +x toward +y, in [0, pi)

    @classmethod
    def make(cls, cx, cy, r1, r2, angle) -> "Ellipse":
        """Normalise any (r1, r2, angle) so that a >= b and angle is in [0, pi)."""
        r1, r2 = abs(float(r1)), abs(float(r2))
        angle = float(angle)
        if r2 > r1:
            r1, r2, angle = r2, r1, angle + math.pi / 2
        return cls(float(cx), float(cy), r1, r2, angle % math.pi)

    @property
    def perimeter(self) -> float:
        return ramanujan_perimeter(self.a, self.b)

    def matrix(self) -> np.ndarray:
        """M such that the ellipse is {c + M u : |u| = 1}."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        return np.array([[c, -s], [s, c]]) @ np.diag([self.a, self.b])

    def scaled(self, sx: float, sy: float) -> "Ellipse":
        """The same curve after scaling x by sx and y by sy (exact, also for sx != sy)."""
        m = np.diag([sx, sy]) @ self.matrix()
        u, sv, _ = np.linalg.svd(m)
        return Ellipse.make(self.cx * sx, self.cy * sy, sv[0], sv[1], math.atan2(u[1, 0], u[0, 0]))

    def to_mm(self, spacing: tuple[float, float]) -> "Ellipse":
        return self.scaled(spacing[1], spacing[0])

    def to_px(self, spacing: tuple[float, float]) -> "Ellipse":
        return self.scaled(1.0 / spacing[1], 1.0 / spacing[0])

    def points(self, n: int = 360) -> np.ndarray:
        t = np.linspace(0, 2 * math.pi, n, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], 1) @ self.matrix().T + [self.cx, self.cy]

    def bounding_box(self) -> tuple[float, float, float, float]:
        m = self.matrix()
        hx, hy = math.hypot(*m[0]), math.hypot(*m[1])
        return self.cx - hx, self.cy - hy, self.cx + hx, self.cy + hy

    def as_dict(self) -> dict:
        return asdict(self)


def ramanujan_perimeter(a: float, b: float) -> float:
    """Ramanujan's first approximation; relative error < 1e-4 for any head-like eccentricity."""
    return math.pi * (3 * (a + b) - math.sqrt((3 * a + b) * (a + 3 * b)))


def numeric_perimeter(a: float, b: float, n: int = 20000) -> float:
    """Arc length by the trapezoidal rule, which converges spectrally for this periodic integrand."""
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return float(np.sum(np.hypot(a * np.sin(t), b * np.cos(t))) * 2 * math.pi / n)


def fit_points(points_xy: np.ndarray, weights: np.ndarray | None = None) -> Ellipse:
    """Least-squares ellipse through points given as (x, y), each point's squared residual times ``weights``.

    The algebraic fit of OpenCV's ``fitEllipse`` (general conic with the constant term fixed, then the
    quadratic terms refitted about the conic's centre), in float64 numpy: without weights the results
    match OpenCV's to float32 precision.
    """
    pts = np.asarray(points_xy, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < 5:
        raise ValueError("an ellipse needs at least 5 boundary points")
    sw = np.ones(len(pts)) if weights is None else np.sqrt(np.asarray(weights, dtype=np.float64))
    if sw.shape != (len(pts),) or not np.all(np.isfinite(sw)):
        raise ValueError(f"need one finite weight >= 0 per point: {len(pts)} points, weights {np.shape(weights)}")
    origin = pts.mean(0)
    p = pts - origin
    scale = 1.0 / max(float(np.abs(p).mean()), 1e-12)  # conditioning only: the fit is scale-invariant
    x, y = p[:, 0] * scale, p[:, 1] * scale
    conic, _, rank, _ = np.linalg.lstsq(np.stack([-x * x, -y * y, -x * y, x, y], 1) * sw[:, None], sw, rcond=None)
    if rank < 5:  # collinear or repeated points: no unique conic
        raise ValueError("the points do not outline an ellipse")
    try:
        centre = np.linalg.solve([[2 * conic[0], conic[2]], [conic[2], 2 * conic[1]]], conic[3:5])
    except np.linalg.LinAlgError:
        raise ValueError("the points do not outline an ellipse") from None
    u, v = x - centre[0], y - centre[1]
    (qa, qb, qc), _, rank, _ = np.linalg.lstsq(np.stack([u * u, v * v, u * v], 1) * sw[:, None], sw, rcond=None)
    if rank < 3:
        raise ValueError("the points do not outline an ellipse")
    # A u^2 + B v^2 + C uv = 1: eigenvalues of [[A, C/2], [C/2, B]] are 1/semi-axis^2
    evals, evecs = np.linalg.eigh([[qa, qc / 2], [qc / 2, qb]])
    evals = np.abs(evals)
    if not np.all(np.isfinite(evals)) or evals.min() <= 1e-12 * max(evals.max(), 1e-300):
        raise ValueError("the points do not outline an ellipse")
    major = evecs[:, 0]  # smallest eigenvalue: the long axis
    return Ellipse.make(origin[0] + centre[0] / scale, origin[1] + centre[1] / scale,
                        1.0 / (math.sqrt(evals[0]) * scale), 1.0 / (math.sqrt(evals[1]) * scale),
                        math.atan2(major[1], major[0]))


def _runs(binary: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of True: (row, first column, one past the last column), in raster order."""
    h, w = binary.shape
    padded = np.zeros((h, w + 2), bool)
    padded[:, 1:-1] = binary
    edges = np.flatnonzero(padded[:, 1:] != padded[:, :-1])  # rows close inside the padding: start, end pairs
    rows, starts = np.divmod(edges[0::2], w + 1)
    return rows, starts, edges[1::2] - rows * (w + 1)


def _run_labels(rows, starts, ends, width: int, diagonal: bool) -> np.ndarray:
    """Connected-component label per run (the smallest run index of its component), pixels 8- or
    4-connected. Union-find over the runs' overlaps with the next row, vectorised as hook + pointer jumping."""
    n = len(rows)
    parent = np.arange(n)
    key = width + 2
    s_key, e_key = rows * key + starts, rows * key + ends
    # run j of the next row touches run i when s_j <= e_i (- 1 for 4-connectivity) and e_j >= s_i (+ 1)
    reach = 0 if diagonal else 1
    lo = np.searchsorted(e_key, (rows + 1) * key + starts + reach, "left")
    hi = np.searchsorted(s_key, (rows + 1) * key + ends - reach, "right")
    counts = np.maximum(hi - lo, 0)
    first = np.repeat(np.arange(n), counts)
    second = np.repeat(lo - np.cumsum(counts) + counts, counts) + np.arange(int(counts.sum()))
    while True:
        a, b = parent[first], parent[second]
        differ = a != b
        if not differ.any():
            return parent
        np.minimum.at(parent, np.maximum(a, b)[differ], np.minimum(a, b)[differ])  # hook roots to smaller roots
        while True:  # pointer jumping until every run points at its root
            up = parent[parent]
            if np.array_equal(up, parent):
                break
            parent = up


def _paint(shape, rows, starts, ends) -> np.ndarray:
    out = np.zeros(shape[0] * shape[1], bool)
    lengths = ends - starts
    offsets = np.repeat(rows * shape[1] + starts - np.cumsum(lengths) + lengths, lengths)
    out[offsets + np.arange(int(lengths.sum()))] = True
    return out.reshape(shape)


def largest_component(binary: np.ndarray) -> np.ndarray:
    """Largest 8-connected component with its holes filled (bool array)."""
    binary = np.asarray(binary, bool)
    rows, starts, ends = _runs(binary)
    out = np.zeros(binary.shape, bool)
    if len(rows) == 0:
        return out
    labels = _run_labels(rows, starts, ends, binary.shape[1], diagonal=True)
    area = np.bincount(labels, weights=ends - starts, minlength=len(rows))
    keep = labels == int(np.argmax(area))  # ties: the component met first in raster order, as OpenCV
    r, s, e = rows[keep], starts[keep], ends[keep]
    # Holes: background (4-connected, as inside an 8-connected outline) in the component's box padded
    # by one pixel that cannot reach the padding.
    r0, c0 = int(r.min()) - 1, int(s.min()) - 1
    box_shape = (int(r.max()) - r0 + 2, int(e.max()) - c0 + 1)
    bg = ~_paint(box_shape, r - r0, s - c0, e - c0)
    br, bs, be = _runs(bg)
    outside = _run_labels(br, bs, be, box_shape[1], diagonal=False) == 0  # run 0: the top padding row
    filled = ~_paint(box_shape, br[outside], bs[outside], be[outside])
    out[r0 + 1:r0 + box_shape[0] - 1, c0 + 1:c0 + box_shape[1] - 1] = filled[1:-1, 1:-1]
    return out


def boundary_points(mask: np.ndarray, soft: np.ndarray | None = None, level: float = 0.5) -> np.ndarray:
    """Sub-pixel outer boundary of the largest component, as (x, y) pixel coordinates.

    Points sit where the mask crosses ``level`` between a pixel of the (hole-filled) component and a
    4-neighbour outside it, interpolated on the soft mask when given. Using pixel centres instead would
    shrink the ellipse by half a pixel (about -0.5 mm of HC at typical spacings).
    """
    return region_boundary(largest_component(mask), soft, level)


def region_boundary(region: np.ndarray, soft: np.ndarray | None = None, level: float = 0.5) -> np.ndarray:
    """:func:`boundary_points` of a region that already is one hole-filled component (bool)."""
    vals = region.astype(np.float32) if soft is None else np.asarray(soft, np.float32)

    def crossings(first_in, second_in, v_first, v_second):
        """Offsets t in [0, 1] from the inside pixel toward the outside one, where both lie."""
        sel = first_in & ~second_in
        if soft is None:
            return sel, np.full(int(sel.sum()), 0.5)
        vi, vo = v_first[sel], v_second[sel]
        return sel, np.clip((vi - level) / np.maximum(vi - vo, 1e-6), 0.0, 1.0)

    pts = []
    up, down, v_up, v_down = region[:-1], region[1:], vals[:-1], vals[1:]
    sel, t = crossings(up, down, v_up, v_down)  # inside above, outside below
    r, c = np.nonzero(sel); pts.append(np.stack([c, r + t], 1))
    sel, t = crossings(down, up, v_down, v_up)  # inside below, outside above
    r, c = np.nonzero(sel); pts.append(np.stack([c, r + 1 - t], 1))
    left, right, v_left, v_right = region[:, :-1], region[:, 1:], vals[:, :-1], vals[:, 1:]
    sel, t = crossings(left, right, v_left, v_right)
    r, c = np.nonzero(sel); pts.append(np.stack([c + t, r], 1))
    sel, t = crossings(right, left, v_right, v_left)
    r, c = np.nonzero(sel); pts.append(np.stack([c + 1 - t, r], 1))
    return np.concatenate(pts, 0).astype(np.float64)


def fit_mask(mask: np.ndarray, spacing: tuple[float, float] | None = None,
             soft: np.ndarray | None = None) -> tuple[Ellipse, Ellipse | None]:
    """Fit the ellipse to a mask; returns (ellipse in pixels, ellipse in mm or None).

    With anisotropic spacing the mm ellipse is fitted to boundary points in mm, which is not the same
    as scaling the pixel fit's axes by one factor.
    """
    pts = boundary_points(mask, soft)
    if len(pts) < 5:
        raise ValueError("mask too small to fit an ellipse")
    px = fit_points(pts)
    if spacing is None:
        return px, None
    dy, dx = spacing
    return px, fit_points(pts * [dx, dy])


def fit_annotation(ring: np.ndarray) -> Ellipse:
    """HC18 ground truth: fit to *all* outline pixels (the ~1-3 px drawn ring), in pixels.

    Taking only the first external contour (a common recipe) biases HC by about +0.75 mm.
    """
    r, c = np.nonzero(ring)
    return fit_points(np.stack([c, r], 1).astype(np.float64))


def ellipse_mask(e: Ellipse, shape: tuple[int, int]) -> np.ndarray:
    """Filled ellipse (pixel ellipse) rasterised at pixel centres, bool of ``shape``."""
    h, w = shape
    x0, y0, x1, y1 = e.bounding_box()
    out = np.zeros((h, w), bool)
    r0, r1 = max(0, int(math.floor(y0))), min(h, int(math.ceil(y1)) + 1)
    c0, c1 = max(0, int(math.floor(x0))), min(w, int(math.ceil(x1)) + 1)
    if r0 >= r1 or c0 >= c1:
        return out
    yy, xx = np.mgrid[r0:r1, c0:c1]
    dx, dy = xx - e.cx, yy - e.cy
    ca, sa = math.cos(e.angle), math.sin(e.angle)
    u, v = dx * ca + dy * sa, -dx * sa + dy * ca
    out[r0:r1, c0:c1] = (u / e.a) ** 2 + (v / e.b) ** 2 <= 1.0
    return out


def ellipse_agreement(mask: np.ndarray, e: Ellipse) -> float:
    """Dice of a mask with an ellipse, inside the image (a head cut by the border is not penalised)."""
    return dice(mask, ellipse_mask(e, mask.shape))


def radial_residual(e: Ellipse, pts: np.ndarray) -> np.ndarray:
    """Relative radial distance of each (x, y) point from ellipse ``e`` (0 on it, 0.1 = 10 % outside)."""
    u = (np.asarray(pts, float) - [e.cx, e.cy]) @ np.linalg.inv(e.matrix()).T
    return np.hypot(u[:, 0], u[:, 1]) - 1.0


def touches_border(e: Ellipse, shape: tuple[int, int], margin: float = 0.5) -> bool:
    """True when the pixel ellipse leaves the image, i.e. part of the head is cut off."""
    x0, y0, x1, y1 = e.bounding_box()
    h, w = shape
    return x0 < -margin or y0 < -margin or x1 > w - 1 + margin or y1 > h - 1 + margin


def dice(m1: np.ndarray, m2: np.ndarray) -> float:
    m1, m2 = m1.astype(bool), m2.astype(bool)
    s = m1.sum() + m2.sum()
    return 1.0 if s == 0 else float(2.0 * np.logical_and(m1, m2).sum() / s)


def hausdorff(e1: Ellipse, e2: Ellipse, n: int = 2000) -> float:
    """Symmetric Hausdorff distance between two ellipse outlines (same units as the ellipses)."""
    p, q = e1.points(n), e2.points(n)
    d1 = np.full(n, np.inf)
    d2 = np.full(n, np.inf)
    for i in range(0, n, 500):  # chunked to bound memory
        d = np.linalg.norm(p[i:i + 500, None] - q[None], axis=2)
        d1[i:i + 500] = d.min(1)
        d2 = np.minimum(d2, d.min(0))
    return float(max(d1.max(), d2.max()))
