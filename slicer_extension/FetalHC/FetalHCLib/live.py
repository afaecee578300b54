"""Live measurement of the FetalHC Logic: what is shown, and how edits re-measure it (no Qt).

:class:`LiveMeasurement` is a mixin of :class:`FetalHCLib.logic.FetalHCLogic` (one Logic; this file
only keeps its longest concern apart). Observers on the head segment and the HC curve schedule a
re-measurement, debounced by ``scheduler`` (in Slicer a Qt single-shot timer; headless :meth:`flush`).
The outline edited last is the measured one -- "AI", "edited mask" or "edited ellipse" -- and is what
Submit sends. Editing the curve never touches the segment; editing the segment redraws the curve as the
fit of the new mask (and says so when that replaces an edited ellipse). The server's mask and result
are kept for "Revert to AI result". Events that change neither outline (a display conversion, a
selection) are ignored by digest.
"""
from __future__ import annotations

import logging

import numpy as np
import slicer

from . import nodes, results
from .nodes import FetalHCError
from .shared import clinical, geometry, result as fresult

DEBOUNCE_MS = 250  # edits -> new HC within a second, without refitting on every mouse move
SEGMENT_EVENTS = ("RepresentationModified", "SegmentModified")
CURVE_EVENTS = ("PointModifiedEvent", "PointAddedEvent", "PointRemovedEvent")


class LiveMeasurement:
    """Needs ``self.scene`` and ``self.known_ga()`` from the Logic; call :meth:`init_live` in its __init__."""

    def init_live(self, scheduler=None) -> None:
        self.scheduler = scheduler  # (delay_ms, callable); None: edits wait for flush()
        self._observations: dict[str, list] = {}
        self._pending: dict[str, str] = {}
        self._scheduled = False
        self._quiet = 0  # > 0 while the logic itself writes the segment/curve
        self.listeners = []  # callables(volume, Result) after each live update

    def accept_ai(self, volume, result, mask: np.ndarray | None):
        """Show the AI result and keep it (mask and ellipse) for "Revert to AI result"."""
        result.outline_source = fresult.OUTLINE_AI
        results.store_result(volume, result, nodes.ATTR_AI_RESULT)
        if mask is not None:
            nodes.store_ai_mask(volume, mask)
        return self.show(volume, result, mask)

    def show(self, volume, res, mask: np.ndarray | None = None, *, curve: bool = True):
        """Show a Result on ``volume``: segment (when ``mask``), HC curve, table, stored result; observe
        the segment and curve for edits. When the volume has no calibration and the server measured with
        one, the volume takes the server's spacing so the curve (in RAS mm) shows the same HC."""
        warnings = list(res.extra.get("warnings") or [])
        own, server = nodes.volume_spacing(volume), res.spacing
        with self._writing():
            if server is not None and own is None:
                nodes.set_spacing(volume, server.row_mm, server.col_mm, f"{nodes.SRC_SERVER}: {server.source}")
            elif server is not None and not np.allclose(own.as_tuple(), server.as_tuple(),
                                                         rtol=nodes.SPACING_TOLERANCE, atol=0):
                warnings.append(f"the server measured with spacing {server.col_mm:.4f} x {server.row_mm:.4f} mm "
                                f"({server.source}), the volume has {own.col_mm:.4f} x {own.row_mm:.4f} mm "
                                f"({own.source})")
            if mask is not None:
                nodes.set_head_segment(volume, mask)
            ellipse = nodes.ellipse_for_curve(res)
            if ellipse is not None and curve:
                nodes.set_head_curve(volume, ellipse)
            elif ellipse is None and volume.GetNodeReference(nodes.REF_CURVE) is not None:
                volume.GetNodeReference(nodes.REF_CURVE).RemoveAllControlPoints()  # no stale outline
        res.extra["curve_length_mm"] = nodes.curve_length_mm(volume) if ellipse is not None else None
        if res.hc_mm is None and res.hc_px is not None and nodes.volume_spacing(volume) is None:
            warnings.append("no pixel spacing: HC is in pixels only; enter the pixel size")
        res.extra["warnings"] = warnings
        if res.ellipse_px is None and res.outline_source == fresult.OUTLINE_AI:
            warnings.append("No head measured: paint the head with the Segment Editor (the HC follows as you "
                            "paint), or try another image.")
        results.store_result(volume, res)
        results.update_table(volume, res)
        self._remember_outlines(volume)
        self.observe(volume)
        return res

    @staticmethod
    def _remember_outlines(volume) -> None:
        """Digests of the segment and curve just shown: an event that changes neither (a display
        conversion, a selection) is no edit and must not turn an AI outline into an "edited" one."""
        volume.SetAttribute(nodes.ATTR_MASK_DIGEST, nodes.mask_digest(volume))
        volume.SetAttribute(nodes.ATTR_CURVE_DIGEST, nodes.curve_digest(volume))

    def refresh_centile(self, volume):
        """After the known GA changed: the shown result's centile for the new GA (same clinical core)."""
        res = self.current_result(volume)
        if res is None or res.hc_mm is None:
            return res
        ga = self.known_ga()
        res.qc_reasons = [r for r in res.qc_reasons if "INTERGROWTH" not in r]
        res.centile = None
        if ga is not None:
            try:
                res.centile = clinical.hc_centile(res.hc_mm, ga)
            except ValueError as e:
                res.qc_reasons.append(str(e))
        return self.show(volume, res, curve=False)

    def current_result(self, volume):
        return results.stored_result(volume)

    def observe(self, volume) -> None:
        """Watch the volume's head segment and HC curve; an edit schedules :meth:`remeasure`."""
        vid = volume.GetID()
        wanted = [n for n in (volume.GetNodeReference(nodes.REF_SEG), volume.GetNodeReference(nodes.REF_CURVE)) if n]
        current = self._observations.get(vid, [])
        if sorted(id(o[0]) for o in current) == sorted(id(n) for n in wanted):
            return
        self.unobserve(vid)
        obs = []
        for node in wanted:
            if node.IsA("vtkMRMLSegmentationNode"):
                target, events, kind = node.GetSegmentation(), SEGMENT_EVENTS, fresult.OUTLINE_MASK
                events = [getattr(slicer.vtkSegmentation, e) for e in events]
            else:
                target, kind = node, fresult.OUTLINE_ELLIPSE
                events = [getattr(slicer.vtkMRMLMarkupsNode, e) for e in CURVE_EVENTS]
            for event in events:
                tag = target.AddObserver(event, lambda *_a, k=kind: self._edited(vid, k))
                obs.append((node, target, tag))
        self._observations[vid] = obs

    def unobserve(self, vid: str) -> None:
        for _node, target, tag in self._observations.pop(vid, []):
            target.RemoveObserver(tag)

    def _edited(self, vid: str, kind: str) -> None:
        if self._quiet:
            return
        self._pending[vid] = kind
        if self.scheduler is not None and not self._scheduled:
            self._scheduled = True
            self.scheduler(DEBOUNCE_MS, self.flush)

    @property
    def pending(self) -> dict:
        return dict(self._pending)

    def flush(self) -> list:
        """Re-measure every volume edited since the last flush; returns the new Results."""
        self._scheduled = False
        done = []
        pending, self._pending = self._pending, {}
        for vid, kind in pending.items():
            volume = self.scene.GetNodeByID(vid)
            if volume is None:
                continue
            digest = nodes.mask_digest(volume) if kind == fresult.OUTLINE_MASK else nodes.curve_digest(volume)
            attr = nodes.ATTR_MASK_DIGEST if kind == fresult.OUTLINE_MASK else nodes.ATTR_CURVE_DIGEST
            if digest == volume.GetAttribute(attr):
                continue  # the event changed nothing we measure
            try:
                res = self.remeasure(volume, kind)
            except FetalHCError as e:
                res = self._empty(volume, kind, str(e))
            except Exception as e:  # a bug must not leave a stale HC on screen
                logging.exception("FetalHC re-measurement")
                res = self._empty(volume, kind, f"re-measurement failed: {type(e).__name__}: {e}")
            done.append(res)
            for listener in self.listeners:
                listener(volume, res)
        return done

    def remeasure(self, volume, source: str = fresult.OUTLINE_MASK):
        """Measure the edited outline with the shared core: the segment (``"edited mask"``) or the curve
        (``"edited ellipse"``)."""
        previous = self.current_result(volume) or fresult.Result()
        spacing = nodes.volume_spacing(volume)
        warnings = []
        if source == fresult.OUTLINE_MASK:
            mask = nodes.segment_mask(volume)
            region = geometry.largest_component(mask)
            if not region.any():
                raise FetalHCError("the 'Fetal head' segment is empty: paint the head")
            outline = dict(points_px=geometry.region_boundary(region), region=region, image_shape=region.shape)
            if previous.outline_source == fresult.OUTLINE_ELLIPSE:
                warnings.append("the edited ellipse was replaced by the fit of the edited mask "
                                "(Revert to AI result restores the server's outline)")
        elif source == fresult.OUTLINE_ELLIPSE:
            outline = dict(points_px=nodes.curve_pixels(volume), image_shape=nodes.image_shape(volume))
        else:
            raise ValueError(f"source must be {fresult.OUTLINE_MASK!r} or {fresult.OUTLINE_ELLIPSE!r}, not {source!r}")
        try:
            # The server's outline QC too: an edit can cut the head at the border or stop being an ellipse.
            res = fresult.measure_points(spacing=spacing, ga_weeks=self.known_ga(), outline_source=source, **outline)
        except ValueError as e:
            raise FetalHCError(f"cannot fit an ellipse to the {source}: {e}") from None
        res.model_version = previous.model_version
        res.extra["warnings"] = warnings
        return self.show(volume, res, curve=source == fresult.OUTLINE_MASK)

    def _empty(self, volume, source: str, reason: str):
        res = fresult.Result(outline_source=source, qc_ok=False, qc_reasons=[reason],
                             spacing=nodes.volume_spacing(volume))
        results.store_result(volume, res)
        results.update_table(volume, res)
        self._remember_outlines(volume)
        return res

    def revert_to_ai(self, volume):
        """Restore the server's mask, ellipse and result."""
        ai = results.stored_result(volume, nodes.ATTR_AI_RESULT)
        if ai is None:
            raise FetalHCError("there is no AI result to revert to: run Segment head first")
        self._pending.pop(volume.GetID(), None)
        return self.show(volume, ai, nodes.ai_mask(volume))

    def _writing(self):
        logic = self

        class Quiet:
            def __enter__(self):
                logic._quiet += 1

            def __exit__(self, *exc):
                logic._quiet -= 1
        return Quiet()

    def outline_mask(self, volume) -> np.ndarray:
        """The mask Submit sends: the segment, or the filled edited ellipse when the curve was edited."""
        res = self.current_result(volume)
        if res is not None and res.outline_source == fresult.OUTLINE_ELLIPSE and res.ellipse_px is not None:
            return geometry.ellipse_mask(res.ellipse_px, nodes.image_shape(volume)).astype(np.uint8)
        return nodes.segment_mask(volume)
