"""The log format of every adala process (stage runs, launchers, batch scripts)."""
import logging


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
