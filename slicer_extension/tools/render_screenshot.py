"""Render what the FetalHC module shows from the MRML nodes, headless: slice view + results panel.

The picture is drawn from node data only: the volume's voxels, the "Fetal head" segment exported on the
volume grid, the HC curve's control points and interpolated points taken back from RAS to pixels, and
the results table node. Used by tests/test_slicer_server.py (docs/screenshot.png, with
FETALHC_UPDATE_SCREENSHOT=1).
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from FetalHCLib import nodes, results  # noqa: E402


def render(volume, out_path: str, title: str = "") -> str:
    pixels = nodes.volume_array(volume)[0]
    mask = nodes.segment_mask(volume)
    curve = volume.GetNodeReference(nodes.REF_CURVE)
    n = curve.GetNumberOfControlPoints()
    control = nodes.ras_to_pixels(volume, np.array([curve.GetNthControlPointPositionWorld(i) for i in range(n)]))
    outline = nodes.curve_pixels(volume)
    rows = list(results.table_values(volume).items())
    length = nodes.curve_length_mm(volume)

    h, w = pixels.shape
    fig = plt.figure(figsize=(12, 12 * h / w * 0.62 + 0.6), dpi=110, facecolor="#2b2b2b")
    view = fig.add_axes([0.0, 0.0, 0.64, 0.95])
    view.imshow(pixels, cmap="gray", interpolation="bilinear")
    tint = np.zeros((h, w, 4))
    tint[mask > 0] = (*nodes.SEGMENT_COLOR, 0.28)
    view.imshow(tint, interpolation="nearest")
    view.contour(mask, levels=[0.5], colors=[nodes.SEGMENT_COLOR], linewidths=1.2)
    closed = np.vstack([outline, outline[:1]])
    view.plot(closed[:, 0], closed[:, 1], color=nodes.CURVE_COLOR, lw=1.8)
    view.plot(control[:, 0], control[:, 1], "o", ms=4.5, mfc=nodes.CURVE_COLOR, mec="k", mew=0.5)
    top = control[np.argmin(control[:, 1])]
    view.text(top[0], top[1] - 12, f"{curve.GetName()}  {length:.1f} mm", color=nodes.CURVE_COLOR, ha="center",
              va="bottom", fontsize=10, weight="bold", bbox=dict(fc="black", ec="none", alpha=0.55, pad=2))
    view.set_xlim(0, w - 1)
    view.set_ylim(h - 1, 0)
    view.axis("off")
    fig.text(0.005, 0.965, title or f"Red slice view: {volume.GetName()}", color="white", fontsize=10)

    panel = fig.add_axes([0.655, 0.0, 0.345, 0.95])
    panel.set_facecolor("#f0f0f0")
    panel.set_xticks([]), panel.set_yticks([])
    panel.text(0.04, 0.97, "FetalHC  >  3. Measure", fontsize=11, weight="bold", va="top", transform=panel.transAxes)
    y = 0.90
    for key, value in rows:
        colour = "#b9770e" if key == "Warning" or value.startswith("FAILED") else "black"
        panel.text(0.04, y, key, fontsize=9, weight="bold", va="top", transform=panel.transAxes)
        panel.text(0.40, y, _wrap(value, 34), fontsize=9, va="top", color=colour, transform=panel.transAxes)
        y -= 0.045 * (1 + _wrap(value, 34).count("\n")) + 0.012
    panel.text(0.04, 0.03, "Curve length = HC (Markups length measurement)", fontsize=8, color="#555",
               transform=panel.transAxes)
    fig.savefig(out_path, facecolor=fig.get_facecolor())
    plt.close(fig)
    return out_path


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join(lines + [line])
