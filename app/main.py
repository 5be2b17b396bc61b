"""``rdc-studio``: the desktop application."""
from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rdc-studio", description="RDC Studio: classify images with a diffusion model")
    p.add_argument("image", nargs="?", help="image to open at start")
    p.add_argument("--model", default=None, help="bundled model name or checkpoint path")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--levels", "--steps", dest="levels", type=int, default=None, metavar="T",
                   help="noise levels T of the classifier (default: the model card's)")
    p.add_argument("--session", default=None, help="reopen a saved session (model, image, settings) and re-run it")
    p.add_argument("--screenshot", default=None, help="classify IMAGE, save a PNG of the window and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.screenshot:
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import QCoreApplication, QEvent, QEventLoop, QTimer
    from PySide6.QtWidgets import QApplication, QMessageBox

    from ..core.defense import DeviceUnavailableError, resolve_device, setup_threads
    from ..core.models import CheckpointError, load_checkpoint

    from .interrupt import InterruptHandler
    from .main_window import MainWindow, model_problem
    from .worker import live_workers, wait_for_workers

    setup_threads(0)  # OMP_NUM_THREADS, else one thread per usable core; the GUI thread mostly waits
    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName("RDC Studio")
    from ..core.session import SessionError, load_session, session_model

    try:
        device = resolve_device(args.device)
        session = load_session(args.session) if args.session else None
        # a session's bundled model is found in this installation (the window warns of other weights)
        model = load_checkpoint(session_model(session, check_sha256=False)[0] if session else args.model, device=device)
        if problem := model_problem(model):
            raise CheckpointError(problem)
    except (CheckpointError, SessionError, DeviceUnavailableError, OSError, RuntimeError, MemoryError,
            RecursionError) as exc:
        message = str(exc)
        print(f"rdc-studio: error: {message}", file=sys.stderr)
        if not args.screenshot:
            QMessageBox.critical(None, "Cannot load model", message)
        return 2
    window = MainWindow(model, device=device, steps=args.levels)
    if args.screenshot:  # a fixed size, whatever geometry an earlier session saved
        window.resize(1280, 800)
    window.show()
    if args.screenshot:
        result = {"code": 0}
        loop = QEventLoop()  # a local loop: never quit an application we may not own

        def grab(*_):
            app.processEvents()
            pixmap = window.grab()
            if not pixmap.save(args.screenshot, "PNG"):
                print(f"rdc-studio: error: cannot write {args.screenshot}", file=sys.stderr)
                result["code"] = 1
            window.close()
            loop.quit()

        if args.image or session:
            window.classification_finished.connect(lambda _p: QTimer.singleShot(200, grab))
            window.runner.failed.connect(lambda _m: QTimer.singleShot(0, grab))
            opened = window.open_session(args.session) if session else window.open_path(args.image)
            if not opened:
                result["code"] = 1
                QTimer.singleShot(0, grab)
        else:
            QTimer.singleShot(500, grab)
        loop.exec()
        # destroy the window now, while the application is alive (not at interpreter exit)
        window.runner.shutdown()
        window.deleteLater()
        QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
        return result["code"]
    if session:
        QTimer.singleShot(0, lambda: window.open_session(args.session))
    elif args.image:
        QTimer.singleShot(0, lambda: window.open_path(args.image))
    interrupt = InterruptHandler(window.close)  # Ctrl+C: the same clean close as File > Quit
    code = app.exec()
    interrupt.uninstall()
    # the window has closed after its jobs ended; join any worker left: every job polls its cancellation,
    # and a running QThread destroyed at exit would abort the process
    if not wait_for_workers(10000):
        print(f"rdc-studio: waiting for {live_workers()} background job(s) to stop…", file=sys.stderr)
        wait_for_workers(None)
    window.deleteLater()
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    return code


if __name__ == "__main__":
    sys.exit(main())
