"""FetalHC: fetal head circumference from 2-D ultrasound with a FetalHC MONAI Label server.

The widget is a thin Qt layer over FetalHCLib (no Qt there): every MRML change and every request is made
by FetalHCLib.flow / FetalHCLib.logic, which the headless tests (tests/test_slicer_*.py) drive too.
"""
import logging
import os
import threading

import qt
import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from FetalHCLib import core, logic as hclogic, selftest
from FetalHCLib.client import DEFAULT_URL, ServerError
from FetalHCLib.flow import DEFAULT_MODEL, DEFAULT_STRATEGY, Flow, prepare

SETTINGS_URL = "FetalHC/ServerURL"
TRAIN_POLL_MS = 5000


class FetalHC(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "FetalHC"
        self.parent.categories = ["Ultrasound"]
        self.parent.dependencies = []
        self.parent.contributors = ["FetalHC contributors"]
        self.parent.helpText = (
            "Fetal head circumference (HC) from a 2-D ultrasound image with a FetalHC MONAI Label server: "
            "head mask as a segment, fitted ellipse as a closed curve whose length is the HC, Hadlock "
            "gestational age, QC, correction with the Segment Editor and active learning.")
        self.parent.acknowledgementText = (
            "Sample data: HC18 challenge (van den Heuvel et al. 2018, doi:10.5281/zenodo.1322001, CC BY 4.0). "
            "Research use only; not a medical device.")


class Cancelled(Exception):
    pass


class FetalHCWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.ui = None
        self.trainTimer = None
        self._polling = False

    # ----------------------------------------------------------------------------------- setup
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FetalHC.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = FetalHCLogic()

        self.ui.serverUrlEdit.text = qt.QSettings().value(SETTINGS_URL, DEFAULT_URL)
        self.ui.connectButton.connect("clicked(bool)", self.onConnect)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputChanged)
        self.ui.applyPixelSizeButton.connect("clicked(bool)", self.onApplyPixelSize)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.nextImageButton.connect("clicked(bool)", self.onNextImage)
        self.ui.segmentEditorButton.connect("clicked(bool)", self.onSegmentEditor)
        self.ui.recomputeButton.connect("clicked(bool)", self.onRecompute)
        self.ui.submitButton.connect("clicked(bool)", self.onSubmit)
        self.ui.trainButton.connect("clicked(bool)", self.onTrain)
        self.ui.stopTrainButton.connect("clicked(bool)", self.onStopTrain)
        self.ui.modelComboBox.addItem(DEFAULT_MODEL)
        self.ui.strategyComboBox.addItem(DEFAULT_STRATEGY)

        self.trainTimer = qt.QTimer()
        self.trainTimer.setInterval(TRAIN_POLL_MS)
        self.trainTimer.connect("timeout()", self.pollTraining)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneClosed)
        self.onInputChanged(self.ui.inputVolumeSelector.currentNode())

    def cleanup(self):
        if self.trainTimer:
            self.trainTimer.stop()
        self.removeObservers()

    def onSceneClosed(self, caller=None, event=None):
        self.ui.resultLabel.text = "No result yet."
        self.ui.spacingLabel.text = "-"

    # ---------------------------------------------------------------------------------- helpers
    def flow(self):
        url = self.ui.serverUrlEdit.text.strip() or DEFAULT_URL
        qt.QSettings().setValue(SETTINGS_URL, url)
        return self.logic.flow(url)

    def showStatus(self, text, error=False):
        color = "#c0392b" if error else "#2c7a2c"
        self.ui.statusLabel.text = f"<span style='color:{color}'>{text}</span>" if text else ""
        if error:
            logging.warning(f"FetalHC: {text}")

    def runWithFeedback(self, message, work, *, background=None):
        """``work()`` on the main thread, or ``background()`` in a worker thread while a cancellable
        progress dialog keeps the GUI alive; errors end up as a red message in the panel."""
        self.showStatus(message + "...")
        qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)
        try:
            if background is None:
                return work()
            return work(self.inThread(message, background))
        except Cancelled:
            self.showStatus("Cancelled (the server may still finish the request).", error=True)
        except (ServerError, hclogic.FetalHCError, ImportError, ValueError) as e:
            self.showStatus(str(e), error=True)
        except Exception as e:  # a bug: keep the GUI usable and say so
            logging.exception("FetalHC")
            self.showStatus(f"Unexpected error: {type(e).__name__}: {e}", error=True)
        finally:
            qt.QApplication.restoreOverrideCursor()

    def inThread(self, message, fn):
        box = {}

        def target():
            try:
                box["value"] = fn()
            except Exception as e:  # re-raised on the main thread
                box["error"] = e

        thread = threading.Thread(target=target, name="FetalHC request", daemon=True)
        thread.start()
        dialog = qt.QProgressDialog(message, "Cancel", 0, 0, slicer.util.mainWindow())
        dialog.windowTitle = "FetalHC"
        dialog.setWindowModality(qt.Qt.WindowModal)
        dialog.minimumDuration = 300
        try:
            while thread.is_alive():
                slicer.app.processEvents(qt.QEventLoop.AllEvents, 50)
                thread.join(0.05)
                if dialog.wasCanceled:
                    raise Cancelled()
        finally:
            dialog.close()
        if "error" in box:
            raise box["error"]
        return box["value"]

    def currentVolume(self):
        volume = self.ui.inputVolumeSelector.currentNode()
        if volume is None:
            raise hclogic.FetalHCError("Select an input image first (load it with the DICOM module or Add Data).")
        return volume

    def showResult(self, result):
        rows = hclogic.result_rows(result)
        html = "".join(f"<tr><td><b>{k}</b></td><td>{v}</td></tr>" for k, v in rows if k != "Warning")
        warnings = "".join(f"<br><span style='color:#b9770e'>&#9888; {v}</span>" for k, v in rows if k == "Warning")
        self.ui.resultLabel.text = f"<table>{html}</table>{warnings}"

    # ---------------------------------------------------------------------------------- actions
    def onConnect(self):
        def done(summary):
            for combo, items, default in ((self.ui.modelComboBox, summary["models"], DEFAULT_MODEL),
                                          (self.ui.strategyComboBox, summary["strategies"], DEFAULT_STRATEGY)):
                combo.clear()
                for item in items:
                    combo.addItem(item)
                combo.currentText = default if default in items else (items[0] if items else "")
            self.ui.serverStatusLabel.text = (f"Connected to {summary['name']} {summary['version']}: "
                                              f"models {', '.join(summary['models']) or 'none (no model file yet)'}; "
                                              f"strategies {', '.join(summary['strategies']) or 'none'}")
            self.showStatus("Connected.")
        flow = self.flow()
        self.runWithFeedback("Connecting", done, background=flow.connect)

    def onInputChanged(self, volume):
        if volume is None:
            self.ui.spacingLabel.text = "-"
            return

        def work():
            self.logic.ensureDependencies()
            self.showSpacing(hclogic.resolve_spacing(volume, dicom_file=self.logic.dicomFile(volume)))
            previous = hclogic.last_result(volume)
            if previous is None:
                self.ui.resultLabel.text = "No result yet."
            else:
                self.showResult(previous)
            self.showStatus("")
        self.runWithFeedback("Reading the image calibration", work)

    def showSpacing(self, report):
        text = report["message"]
        if report["warnings"]:
            text += "<br><span style='color:#b9770e'>" + "<br>".join(report["warnings"]) + "</span>"
        self.ui.spacingLabel.text = text
        unknown = report["spacing"] is None
        self.ui.pixelSizeSpinBox.setStyleSheet("background-color: #fdebd0" if unknown else "")

    def onApplyPixelSize(self):
        def work():
            _, report = self.logic.prepare(self.currentVolume(), manual_mm=self.ui.pixelSizeSpinBox.value)
            self.showSpacing(report)
            self.showStatus("Pixel size set; press Segment head (or Recompute).")
        self.runWithFeedback("Setting the pixel size", work)

    def onSegment(self):
        flow = self.flow()
        model = self.ui.modelComboBox.currentText or DEFAULT_MODEL
        volume = self.ui.inputVolumeSelector.currentNode()
        if volume is None:
            return self.showStatus("Select an input image first.", error=True)
        req = None

        def build():
            nonlocal req
            req = flow.infer_request(volume, model, dicom_file=self.logic.dicomFile(volume))
            return req
        if self.runWithFeedback("Preparing the image", build) is None:
            return

        def done(response):
            result = flow.apply_infer(req, response)
            self.logic.showInViews(req.volume)
            if req.volume is not volume:
                self.ui.inputVolumeSelector.setCurrentNode(req.volume)
            self.showResult(result)
            self.showStatus(f"HC {result['hc_mm']:.1f} mm" if result.get("hc_mm") is not None else
                            "Head found, but no HC in mm: the image has no pixel spacing.",
                            error=result.get("hc_mm") is None)
        self.runWithFeedback(f"Segmenting with '{model}' on {flow.client.url}", done,
                             background=lambda: req.call(flow.client))

    def onRecompute(self):
        def work():
            volume = self.currentVolume()
            result = hclogic.recompute(volume, self.ui.recomputeSourceComboBox.currentText)
            self.showResult(result)
            self.showStatus("Recomputed from the edited " + self.ui.recomputeSourceComboBox.currentText + ".")
        self.runWithFeedback("Recomputing", work)

    def onSegmentEditor(self):
        volume = self.ui.inputVolumeSelector.currentNode()
        seg = volume.GetNodeReference(hclogic.REF_SEG) if volume else None
        slicer.util.selectModule("SegmentEditor")
        if seg is not None:
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
            editor.setSegmentationNode(seg)
            if hasattr(editor, "setSourceVolumeNode"):  # Slicer >= 5.4
                editor.setSourceVolumeNode(volume)
            else:
                editor.setMasterVolumeNode(volume)
            editor.setCurrentSegmentID(hclogic.SEGMENT_ID)

    def onSubmit(self):
        flow = self.flow()
        train = self.ui.trainAfterSubmitCheckBox.checked
        model = self.ui.modelComboBox.currentText or DEFAULT_MODEL
        req = self.runWithFeedback("Exporting the segment", lambda: flow.submit_request(self.currentVolume()))
        if req is None:
            return

        def done(out):
            flow.apply_submit(req, out)
            self.showStatus(f"Saved the final label of '{out['image_id']}' on the server" +
                            ("; training started." if out.get("train") is not None else "."))
            if out.get("train") is not None:
                self.trainTimer.start()
        self.runWithFeedback("Submitting the correction", done,
                             background=lambda: flow.submit_call(req, train=train, model=model))

    def onNextImage(self):
        flow = self.flow()
        strategy = self.ui.strategyComboBox.currentText or DEFAULT_STRATEGY

        def done(got):
            volume = flow.apply_next_image(got)
            self.ui.inputVolumeSelector.setCurrentNode(volume)
            self.logic.showInViews(volume)
            self.showStatus(f"Loaded '{got['sample']['id']}' (strategy {strategy}); press Segment head.")
        self.runWithFeedback(f"Asking '{strategy}' for the next image", done,
                             background=lambda: flow.next_image_call(strategy))

    def onTrain(self):
        flow = self.flow()
        model = self.ui.modelComboBox.currentText or DEFAULT_MODEL

        def done(_):
            self.trainTimer.start()
            self.pollTraining()
        self.runWithFeedback("Starting training", done, background=lambda: flow.train_start(model))

    def onStopTrain(self):
        flow = self.flow()
        self.runWithFeedback("Stopping training", lambda _: self.pollTraining(), background=flow.train_stop)

    def pollTraining(self):
        if self._polling:  # the timer fired while the previous poll was still waiting for the server
            return
        self._polling = True
        try:
            self._pollTraining()
        finally:
            self._polling = False

    def _pollTraining(self):
        flow = self.flow()
        model = self.ui.modelComboBox.currentText or DEFAULT_MODEL
        box = {}

        def fetch():  # in a thread: a slow server never freezes the GUI, even while polling
            try:
                box["p"] = flow.train_poll(model)
            except Exception as e:  # ServerError, or a bug: shown, and polling stops
                box["e"] = e
        thread = threading.Thread(target=fetch, daemon=True)
        thread.start()
        while thread.is_alive():
            slicer.app.processEvents(qt.QEventLoop.AllEvents, 50)
            thread.join(0.05)
        if "e" in box:
            self.ui.trainStatusLabel.text = f"Training status unavailable: {box['e']}"
            self.trainTimer.stop()
            return
        p = box["p"]
        self.ui.trainStatusLabel.text = p["text"]
        if p["epoch"] is not None and p["total"]:
            self.ui.trainProgressBar.maximum = int(p["total"])
            self.ui.trainProgressBar.value = int(p["epoch"])
        if not p["running"]:
            self.trainTimer.stop()


class FetalHCLogic(ScriptedLoadableModuleLogic):
    """Slicer-side glue: the FetalHCLib Flow on slicer.mrmlScene, DICOM database lookups, views."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._flow = None

    def flow(self, url=DEFAULT_URL):
        if self._flow is None:
            self._flow = Flow(slicer.mrmlScene, url)
        self._flow.set_url(url)
        return self._flow

    def prepare(self, volume, manual_mm=None):
        self.ensureDependencies()
        return prepare(volume, dicom_file=self.dicomFile(volume), manual_mm=manual_mm)

    @staticmethod
    def ensureDependencies():
        """OpenCV is not bundled with Slicer: offer to pip-install it once."""
        missing = core.missing_dependencies()
        if missing and slicer.util.confirmOkCancelDisplay(
                "FetalHC needs the Python package(s) " + ", ".join(missing) + ". Install now?"):
            slicer.util.pip_install(" ".join(missing))
        core.load()

    @staticmethod
    def dicomFile(volume):
        """The file of a volume loaded by the DICOM module (its first instance), else None."""
        uids = (volume.GetAttribute("DICOM.instanceUIDs") or "").split()
        if not uids or not hasattr(slicer, "dicomDatabase") or slicer.dicomDatabase is None:
            return None
        path = slicer.dicomDatabase.fileForInstance(uids[0])
        return path if path and os.path.exists(path) else None

    @staticmethod
    def showInViews(volume):
        slicer.util.setSliceViewerLayers(background=volume, fit=True)
        for role in (hclogic.REF_SEG, hclogic.REF_CURVE):
            node = volume.GetNodeReference(role)
            if node is not None and node.GetDisplayNode() is not None:
                node.GetDisplayNode().SetVisibility(True)
        table = volume.GetNodeReference(hclogic.REF_TABLE)
        if table is not None:
            slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(table.GetID())


class FetalHCTest(ScriptedLoadableModuleTest):
    """The same scenarios as the headless pytest suite (FetalHCLib.selftest), inside Slicer.

    The server part runs when FETALHC_SERVER_URL names a running FetalHC MONAI Label server (and
    FETALHC_TEST_IMAGE an image, default: the repository's sample-data/hc18/399_HC.png with its pixel size).
    """

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_synthetic_ellipse()
        self.setUp()
        self.test_server_flow()

    def test_synthetic_ellipse(self):
        self.delayDisplay("Synthetic ellipse on a flipped, anisotropic volume")
        FetalHCLogic.ensureDependencies()
        case = selftest.synthetic_case(slicer.mrmlScene)
        shown = case["shown"]
        self.assertAlmostEqual(shown["hc_mm"] / case["truth_hc_mm"], 1.0, delta=0.005)
        self.assertLess(selftest.agreement(shown), selftest.AGREEMENT)
        self.assertLess(selftest.agreement(case["recomputed"]), selftest.AGREEMENT)
        self.assertLess(case["recomputed"]["hc_mm"], shown["hc_mm"])
        self.assertTrue((case["exported"] == case["mask"]).all())
        self.delayDisplay("Synthetic test passed")

    def test_server_flow(self):
        url = os.environ.get("FETALHC_SERVER_URL")
        if not url:
            self.delayDisplay("FETALHC_SERVER_URL not set: server flow skipped")
            return
        image = os.environ.get("FETALHC_TEST_IMAGE") or str(
            core.CHECKOUT_LIB.parent / "sample-data" / "hc18" / "399_HC.png")
        manual = float(os.environ.get("FETALHC_TEST_PIXEL_MM", "0.137776202626"))
        case = selftest.server_case(slicer.mrmlScene, url, image, manual_mm=manual)
        result = case["result"]
        self.assertIsNotNone(result["hc_mm"])
        self.assertLess(selftest.agreement(result), selftest.AGREEMENT)
        self.delayDisplay(f"Server flow passed: HC {result['hc_mm']:.1f} mm")
